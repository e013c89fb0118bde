package kmsv2e2e

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsservice "k8s.io/kms/pkg/service"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/softhsm"
	"github.com/hsmd/hsmd/store/bolt"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// hsmd is a whole hsmd in process on a SoftHSM token: its services on
// hsmd.sock, its KMS v2 plugin for tenant "k8s" on kms.sock.
type hsmd struct {
	kmsSock string
	keys    hsmdv1.KeysClient
}

func startHSMD(t *testing.T) *hsmd {
	t.Helper()
	ctx := context.Background()
	tok := softhsm.NewTestToken(t)
	dir := t.TempDir()
	h, err := hsm.Open(ctx, hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, CallTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(dir, "hsmd.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var eng *envelope.Engine
	m := server.NewMetrics(prometheus.NewRegistry(), func() envelope.Stats { return eng.Stats() })
	if eng, err = envelope.New(envelope.Config{Deriver: m.InstrumentDeriver(h)}); err != nil {
		t.Fatal(err)
	}
	var srv *server.Server
	keys := &rotation.Manager{Store: st, KDKVersion: h.NewestKDK, OnChange: func(_ context.Context, c rotation.Change) error {
		srv.KeyChanged(c)
		for _, v := range c.Versions {
			eng.Forget(c.TenantID, v)
		}
		return nil
	}}
	if srv, err = server.New(server.Config{Store: st, Engine: eng, Metrics: m, Ready: h.Ready, Keys: keys}); err != nil {
		t.Fatal(err)
	}
	g, kg := grpc.NewServer(srv.ServerOptions()...), grpc.NewServer(srv.ServerOptions()...)
	srv.Register(g)
	if err := srv.RegisterKMSv2(kg, "k8s"); err != nil {
		t.Fatal(err)
	}
	d := &hsmd{kmsSock: filepath.Join(dir, "kms.sock")}
	for sock, gs := range map[string]*grpc.Server{filepath.Join(dir, "hsmd.sock"): g, d.kmsSock: kg} {
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		go gs.Serve(l)
	}
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "hsmd.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		kg.Stop()
		g.Stop()
		st.Close()
		if err := h.Close(); err != nil {
			t.Error(err)
		}
		if n := h.OpenSessions(); n != 0 {
			t.Errorf("%d PKCS#11 sessions left open", n)
		}
	})
	d.keys = hsmdv1.NewKeysClient(conn)
	if _, err := hsmdv1.NewTenantsClient(conn).CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: "k8s"}); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *hsmd) rotate(t *testing.T) {
	t.Helper()
	if _, err := d.keys.RotateKey(context.Background(), &hsmdv1.RotateKeyRequest{Tenant: "k8s"}); err != nil {
		t.Fatal(err)
	}
}

// encryptionConfig writes the EncryptionConfiguration docs/KUBERNETES.md
// shows, its endpoint pointed at sock.
func encryptionConfig(t *testing.T, sock string) string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/KUBERNETES.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(doc), "```yaml\n")
	y, _, _ := strings.Cut(rest, "```")
	const endpoint = "endpoint: unix:///run/hsmd/kms.sock"
	if !strings.Contains(y, "kind: EncryptionConfiguration") || !strings.Contains(y, endpoint) {
		t.Fatalf("docs/KUBERNETES.md shows no EncryptionConfiguration for %s:\n%s", endpoint, y)
	}
	p := filepath.Join(t.TempDir(), "encryption-config.yaml")
	if err := os.WriteFile(p, []byte(strings.Replace(y, endpoint, "endpoint: unix://"+sock, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// loadTransformer is what kube-apiserver does at start: load the
// configuration (which dials the plugin and primes its key ID and DEK seed
// with Status and Encrypt) and take the transformer for secrets.
func loadTransformer(t *testing.T, ctx context.Context, path string) (value.Transformer, func() error) {
	t.Helper()
	ec, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, "apiserver-test")
	if err != nil {
		t.Fatal(err)
	}
	tr := ec.Transformers[schema.GroupResource{Resource: "secrets"}]
	if tr == nil || len(ec.HealthChecks) != 1 {
		t.Fatalf("transformers %v, health checks %d", ec.Transformers, len(ec.HealthChecks))
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "/healthz", nil)
	return tr, func() error { return ec.HealthChecks[0].Check(req) }
}

const prefix = "k8s:enc:kms:v2:hsmd:"

// storedKeyID parses what the apiserver writes to etcd and returns the
// key ID recorded with the value.
func storedKeyID(t *testing.T, stored []byte) string {
	t.Helper()
	if !bytes.HasPrefix(stored, []byte(prefix)) {
		t.Fatalf("stored value %q lacks the prefix %q", stored[:min(len(stored), 40)], prefix)
	}
	var o kmstypes.EncryptedObject
	if err := proto.Unmarshal(stored[len(prefix):], &o); err != nil {
		t.Fatal(err)
	}
	if err := kmsv2.ValidateEncryptedObject(&o); err != nil {
		t.Fatal(err)
	}
	return o.KeyID
}

func read(t *testing.T, tr value.Transformer, stored []byte, key string) (string, bool) {
	t.Helper()
	out, stale, err := tr.TransformFromStorage(context.Background(), stored, value.DefaultContext(key))
	if err != nil {
		t.Fatalf("read %s: %v", key, err)
	}
	return string(out), stale
}

// TestAPIServerTransformerWithRotation: the API server's own encryption
// configuration and KMS v2 envelope transformer write and read secrets
// through hsmd; after a RotateKey, the API server's healthz probe sees the
// new key_id, new writes carry it, old values still read (reported stale,
// so a storage migration rewrites them), also by a fresh API server.
func TestAPIServerTransformerWithRotation(t *testing.T) {
	d := startHSMD(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg := encryptionConfig(t, d.kmsSock)
	tr, healthz := loadTransformer(t, ctx, cfg)
	if err := healthz(); err != nil {
		t.Fatal(err)
	}
	const key = "/registry/secrets/default/s1"
	old, err := tr.TransformToStorage(ctx, []byte("secret-v1"), value.DefaultContext(key))
	if err != nil {
		t.Fatal(err)
	}
	if id := storedKeyID(t, old); id != "hsmd:k8s:v1" {
		t.Fatalf("key id %q", id)
	}
	if pt, stale := read(t, tr, old, key); pt != "secret-v1" || stale {
		t.Fatalf("read %q stale=%v", pt, stale)
	}
	if _, _, err := tr.TransformFromStorage(ctx, old, value.DefaultContext("/registry/secrets/default/other")); err == nil {
		t.Fatal("a value read under another etcd key")
	}

	d.rotate(t)
	// The API server re-reads Status when its healthz result expires
	// (20 s after a success); then it asks for a new seed under the new key.
	var cur []byte
	deadline := time.Now().Add(45 * time.Second)
	for {
		if err := healthz(); err != nil {
			t.Fatal(err)
		}
		if cur, err = tr.TransformToStorage(ctx, []byte("secret-v2"), value.DefaultContext(key)); err != nil {
			t.Fatal(err)
		}
		if storedKeyID(t, cur) == "hsmd:k8s:v2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the API server did not pick up the rotation")
		}
		time.Sleep(500 * time.Millisecond)
	}
	if pt, stale := read(t, tr, cur, key); pt != "secret-v2" || stale {
		t.Fatalf("new value %q stale=%v", pt, stale)
	}
	if pt, stale := read(t, tr, old, key); pt != "secret-v1" || !stale {
		t.Fatalf("old value %q stale=%v, want stale (written under v1)", pt, stale)
	}
	// A fresh API server has no cached seeds: it asks hsmd to decrypt both.
	tr2, _ := loadTransformer(t, ctx, cfg)
	if pt, _ := read(t, tr2, old, key); pt != "secret-v1" {
		t.Fatalf("fresh apiserver, old value: %q", pt)
	}
	if pt, _ := read(t, tr2, cur, key); pt != "secret-v2" {
		t.Fatalf("fresh apiserver, new value: %q", pt)
	}
}

// TestAPIServerGRPCClient: the API server's KMS v2 gRPC client
// (kmsv2.NewGRPCService, with its call timeout) against hsmd: Status,
// Encrypt and Decrypt, a rotation seen in the next Status, and one error
// for a bad ciphertext.
func TestAPIServerGRPCClient(t *testing.T) {
	d := startHSMD(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	svc, err := kmsv2.NewGRPCService(ctx, "unix://"+d.kmsSock, "hsmd", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	st, err := svc.Status(ctx)
	if err != nil || st.Healthz != "ok" || st.Version != kmsv2.KMSAPIVersionv2 || st.KeyID != "hsmd:k8s:v1" {
		t.Fatalf("status %+v %v", st, err)
	}
	seed := bytes.Repeat([]byte{7}, 32)
	enc, err := svc.Encrypt(ctx, "uid-1", seed)
	if err != nil || enc.KeyID != st.KeyID {
		t.Fatalf("encrypt %+v %v", enc, err)
	}
	d.rotate(t)
	if st, err := svc.Status(ctx); err != nil || st.KeyID != "hsmd:k8s:v2" {
		t.Fatalf("status after rotation %+v %v", st, err)
	}
	pt, err := svc.Decrypt(ctx, "uid-2", &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID})
	if err != nil || !bytes.Equal(pt, seed) {
		t.Fatalf("decrypt after rotation: %x %v", pt, err)
	}
	bad := bytes.Clone(enc.Ciphertext)
	bad[10] ^= 1
	if _, err := svc.Decrypt(ctx, "uid-3", &kmsservice.DecryptRequest{Ciphertext: bad, KeyID: enc.KeyID}); err == nil ||
		!strings.Contains(err.Error(), "InvalidArgument") {
		t.Fatalf("bad ciphertext: %v", err)
	}
}
