package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/server"
)

// opCall is one call of the authorization matrix: op on tenant.
type opCall struct {
	op string
	do func(ctx context.Context, cc *grpc.ClientConn, tenant string) error
}

var junk = []*hsmdv1.DecryptItem{{Ciphertext: []byte("not a ciphertext")}}

var opCalls = []opCall{
	{"encrypt", func(ctx context.Context, cc *grpc.ClientConn, tn string) error {
		_, err := hsmdv1.NewEnvelopeClient(cc).Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: tn, Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
		return err
	}},
	{"decrypt", func(ctx context.Context, cc *grpc.ClientConn, tn string) error {
		_, err := hsmdv1.NewEnvelopeClient(cc).Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: tn, Items: junk})
		return err
	}},
	{"rewrap", func(ctx context.Context, cc *grpc.ClientConn, tn string) error {
		_, err := hsmdv1.NewEnvelopeClient(cc).Rewrap(ctx, &hsmdv1.RewrapRequest{Tenant: tn, Items: junk})
		return err
	}},
	{"public-key", func(ctx context.Context, cc *grpc.ClientConn, tn string) error {
		_, err := hsmdv1.NewKeysClient(cc).GetPublicKey(ctx, &hsmdv1.GetPublicKeyRequest{Tenant: tn})
		return err
	}},
	{"key-admin", func(ctx context.Context, cc *grpc.ClientConn, tn string) error {
		_, err := hsmdv1.NewKeysClient(cc).GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: tn})
		return err
	}},
	{"tenant-admin", func(ctx context.Context, cc *grpc.ClientConn, tn string) error {
		_, err := hsmdv1.NewTenantsClient(cc).GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: tn})
		return err
	}},
}

func writePolicy(t testing.TB, file, body string) {
	t.Helper()
	if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

const allOps = "[encrypt, decrypt, rewrap, datakey, public-key, key-admin, tenant-admin, audit-sign, audit-read]"

// checkMatrix makes every call of opCalls on tenant over cc and checks it
// is refused with PERMISSION_DENIED exactly when it should be.
func checkMatrix(t *testing.T, cc *grpc.ClientConn, who, tenant string, allowed func(op string) bool) {
	t.Helper()
	for _, c := range opCalls {
		err := c.do(t.Context(), cc, tenant)
		denied := status.Code(err) == codes.PermissionDenied
		if denied == allowed(c.op) {
			t.Errorf("%s %s on %q: %v (allowed: %v)", who, c.op, tenant, err, allowed(c.op))
		}
		if denied && (!strings.Contains(err.Error(), c.op) || !strings.Contains(err.Error(), tenant)) {
			t.Errorf("%s %s on %q: the error %q names neither the operation nor the tenant", who, c.op, tenant, err)
		}
	}
}

func all(string) bool  { return true }
func none(string) bool { return false }

// TestAuthzUnixSocket: the matrix over the unix socket (the test's uid):
// allowed on a granted tenant, refused on another, refused for operations
// not granted, refused when the policy names another uid; refusals are
// audited.
func TestAuthzUnixSocket(t *testing.T) {
	file := filepath.Join(t.TempDir(), "policy.yaml")
	uid := os.Getuid()
	writePolicy(t, file, fmt.Sprintf("principals:\n  - name: me\n    match: [\"uid:%d\"]\n    tenants: [alpha, \"gamma-*\"]\n    operations: %s\n", uid, allOps))
	az, err := server.NewAuthorizer(file, prometheus.NewRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, stackOpts{authz: az, audit: true})
	s.createTenant("alpha")
	s.createTenant("gamma-1")
	checkMatrix(t, s.conn, "uid", "alpha", all)
	checkMatrix(t, s.conn, "uid", "gamma-1", all)
	checkMatrix(t, s.conn, "uid", "beta", none)
	// A Decrypt without a tenant needs the pattern "*".
	if _, err := s.env.Decrypt(t.Context(), &hsmdv1.DecryptRequest{Items: junk}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Decrypt without a tenant: %v, want PERMISSION_DENIED", err)
	}

	writePolicy(t, file, fmt.Sprintf("principals:\n  - name: me\n    match: [\"gid:%d\"]\n    tenants: [\"*\"]\n    operations: [encrypt, decrypt]\n", os.Getgid()))
	if err := az.Reload(); err != nil {
		t.Fatal(err)
	}
	checkMatrix(t, s.conn, "gid", "beta", func(op string) bool { return op == "encrypt" || op == "decrypt" })
	if _, err := s.env.Decrypt(t.Context(), &hsmdv1.DecryptRequest{Items: junk}); err != nil {
		t.Errorf("Decrypt without a tenant under \"*\": %v", err)
	}

	writePolicy(t, file, fmt.Sprintf("principals:\n  - name: other\n    match: [\"uid:%d\"]\n    tenants: [\"*\"]\n    operations: %s\n", uid+1, allOps))
	if err := az.Reload(); err != nil {
		t.Fatal(err)
	}
	checkMatrix(t, s.conn, "other uid", "alpha", none)
	if _, err := s.tenants.ListTenants(t.Context(), &hsmdv1.ListTenantsRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("ListTenants: %v, want PERMISSION_DENIED", err)
	}

	s.stop()
	var denials int
	for _, e := range s.auditEntries() {
		if e.Code == "PERMISSION_DENIED" {
			denials++
			if e.Kind != audit.KindRPC || !strings.HasPrefix(e.Caller, "unix:uid=") {
				t.Errorf("denial entry %+v", e)
			}
		}
	}
	if want := len(opCalls) + 1 + 4 + len(opCalls) + 1; denials != want {
		t.Errorf("%d PERMISSION_DENIED audit entries, want %d", denials, want)
	}
}

// testCA is a CA that issues client certificates.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue makes a client certificate with subject CN cn and, if set, the URI
// SAN uri.
func (ca *testCA) issue(t testing.TB, cn, uri string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestAuthzMutualTLS: over TCP with client certificates, the SPIFFE ID
// and the CN name the caller; a client without a certificate or with one
// from another CA is refused at the handshake.
func TestAuthzMutualTLS(t *testing.T) {
	ca, other := newTestCA(t, "clients"), newTestCA(t, "other")
	serverCert, roots := testServerCert(t)
	cfg, err := server.ServerTLSConfig(server.TLSOptions{Certificate: serverCert, ClientCAs: ca.pool})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, file, `principals:
  - name: billing-svc
    match: ["spiffe://example.org/billing"]
    tenants: ["billing", "billing-*"]
    operations: `+allOps+`
  - name: reporting
    match: ["cn:reporting"]
    tenants: ["billing"]
    operations: [decrypt]
`)
	az, err := server.NewAuthorizer(file, prometheus.NewRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, stackOpts{authz: az, creds: server.TransportCredentials(cfg, nil, nil)})
	dial := func(certs ...tls.Certificate) *grpc.ClientConn {
		cc, err := grpc.NewClient(s.tcpAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: certs})))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return cc
	}
	billing := dial(ca.issue(t, "ignored", "spiffe://example.org/billing"))
	if _, err := hsmdv1.NewTenantsClient(billing).CreateTenant(t.Context(), &hsmdv1.CreateTenantRequest{Name: "billing"}); err != nil {
		t.Fatal(err)
	}
	checkMatrix(t, billing, "spiffe", "billing", all)
	checkMatrix(t, billing, "spiffe", "payroll", none)
	reporting := dial(ca.issue(t, "reporting", ""))
	checkMatrix(t, reporting, "cn", "billing", func(op string) bool { return op == "decrypt" })
	intruder := dial(ca.issue(t, "intruder", "spiffe://example.org/intruder"))
	checkMatrix(t, intruder, "another spiffe ID", "billing", none)

	for name, cc := range map[string]*grpc.ClientConn{"no certificate": dial(), "another CA": dial(other.issue(t, "billing", "spiffe://example.org/billing"))} {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		_, err := hsmdv1.NewEnvelopeClient(cc).Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "billing", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
		cancel()
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s: %v, want UNAVAILABLE (refused at the handshake)", name, err)
		}
	}
}

// TestAuthzReload: a valid change takes effect, by Reload or by Watch;
// an invalid file keeps the old policy and is counted.
func TestAuthzReload(t *testing.T) {
	file := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, file, "principals:\n  - {name: a, match: [\"uid:1\"], tenants: [t], operations: [encrypt]}\n")
	reg := prometheus.NewRegistry()
	az, err := server.NewAuthorizer(file, reg, nil)
	if err != nil {
		t.Fatal(err)
	}
	allowed := func(id string) bool { return az.Policy().Allow([]string{id}, server.OpEncrypt, "t", true) }
	if !allowed("uid:1") || allowed("uid:2") {
		t.Fatal("initial policy not in force")
	}
	if metricValue(t, reg, "hsmd_authz_policy_loaded_timestamp_seconds", nil) == 0 {
		t.Error("hsmd_authz_policy_loaded_timestamp_seconds is 0")
	}
	writePolicy(t, file, "principals:\n  - {name: a, match: [\"uid:2\"], tenants: [t], operations: [encrypt]}\n")
	if err := az.Reload(); err != nil {
		t.Fatal(err)
	}
	if allowed("uid:1") || !allowed("uid:2") {
		t.Fatal("reloaded policy not in force")
	}
	writePolicy(t, file, "principals:\n  - {name: a, match: [\"uid:3\"], tenants: [t], operations: [encrypt], extra: 1}\n")
	if err := az.Reload(); !errors.Is(err, server.ErrPolicy) {
		t.Fatalf("Reload of an invalid file: %v, want ErrPolicy", err)
	}
	if !allowed("uid:2") {
		t.Fatal("an invalid file replaced the policy")
	}
	if n := metricValue(t, reg, "hsmd_authz_policy_reload_errors_total", nil); n != 1 {
		t.Errorf("hsmd_authz_policy_reload_errors_total = %v, want 1", n)
	}

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { az.Watch(ctx, 10*time.Millisecond, nil); close(done) }()
	defer func() { cancel(); <-done }()
	writePolicy(t, file, "principals:\n  - {name: watched, match: [\"uid:4\"], tenants: [t], operations: [encrypt]}\n")
	for deadline := time.Now().Add(5 * time.Second); !allowed("uid:4"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Watch did not load the changed file")
		}
	}
}

// TestParsePolicyErrors: invalid policies fail with ErrPolicy naming the
// YAML path.
func TestParsePolicyErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"principals:\n  - {name: a, match: [\"uid:x\"], tenants: [t], operations: [encrypt]}\n", "principals[0].match[0]"},
		{"principals:\n  - {name: a, match: [\"bob\"], tenants: [t], operations: [encrypt]}\n", "principals[0].match[0]"},
		{"principals:\n  - {name: a, match: [\"cn:a\"], tenants: [\"[\"], operations: [encrypt]}\n", "principals[0].tenants[0]"},
		{"principals:\n  - {name: a, match: [\"cn:a\"], tenants: [t], operations: [sign]}\n", "principals[0].operations[0]"},
		{"principals:\n  - {name: a, match: [\"cn:a\"], tenants: [t]}\n", "principals[0] (a)"},
		{"principals:\n  - {match: [\"cn:a\"], tenants: [t], operations: [encrypt]}\n", "principals[0].name"},
		{"principals:\n  - {name: a, match: [\"cn:a\"], tenants: [t], operations: [encrypt]}\n  - {name: a, match: [\"cn:b\"], tenants: [t], operations: [encrypt]}\n", "principals[1].name"},
		{"principal: []\n", "principal"},
	} {
		_, err := server.ParsePolicy([]byte(tc.body))
		if !errors.Is(err, server.ErrPolicy) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParsePolicy(%q): %v, want ErrPolicy naming %s", tc.body, err, tc.want)
		}
	}
	p, err := server.ParsePolicy([]byte("principals:\n  - {name: a, match: [\"spiffe://example.org/a\", \"cn:a\", \"uid:0\", \"gid:0\"], tenants: [\"*\"], operations: " + allOps + "}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !p.Allow([]string{"cn:a"}, server.OpAuditSign, "", false) || p.Allow([]string{"cn:b"}, server.OpAuditSign, "", false) {
		t.Error("Allow of an unscoped operation")
	}
}

// TestAuthzAuditSignAndKMS: the rest of the matrix. Audit.SignCheckpoint
// (served with the server's options, as the daemon does) needs audit-sign;
// the KMS v2 plugin needs encrypt (Encrypt, and Status, which names the
// current key version) and decrypt (Decrypt) on its tenant.
func TestAuthzAuditSignAndKMS(t *testing.T) {
	file := filepath.Join(t.TempDir(), "policy.yaml")
	uid := os.Getuid()
	grant := func(tenants, ops string) {
		t.Helper()
		writePolicy(t, file, fmt.Sprintf("principals:\n  - name: me\n    match: [\"uid:%d\"]\n    tenants: %s\n    operations: %s\n", uid, tenants, ops))
	}
	grant(`["*"]`, "[tenant-admin]")
	az, err := server.NewAuthorizer(file, prometheus.NewRegistry(), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, stackOpts{authz: az})
	s.createTenant("k8s")

	l := newTestLog(t, "", 2)
	svc, err := server.NewWitnessService(newWitnessKit(t, l, nil).witness(), server.WitnessConfig{})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(s.srv.ServerOptions()...)
	svc.Register(g)
	if err := s.srv.RegisterKMSv2(g, "k8s"); err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("unix", filepath.Join(t.TempDir(), "audit.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	cc, err := grpc.NewClient("unix://"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	auditc, kms := hsmdv1.NewAuditClient(cc), kmsapi.NewKeyManagementServiceClient(cc)

	sign := func() error { _, err := signCP(auditc, 0, nil, l.checkpoint(2)); return err }
	encrypt := func() ([]byte, error) {
		r, err := kms.Encrypt(t.Context(), &kmsapi.EncryptRequest{Uid: "u", Plaintext: make([]byte, 32)})
		return r.GetCiphertext(), err
	}
	denied := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s: %v, want PERMISSION_DENIED", what, err)
		}
	}
	denied("SignCheckpoint without audit-sign", sign())
	_, err = encrypt()
	denied("KMS Encrypt without encrypt", err)
	_, err = kms.Status(t.Context(), &kmsapi.StatusRequest{})
	denied("KMS Status without encrypt (it names the current key version)", err)

	grant(`["k8s"]`, "[audit-sign, encrypt]")
	if err := az.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := sign(); err != nil {
		t.Errorf("SignCheckpoint with audit-sign: %v", err)
	}
	ct, err := encrypt()
	if err != nil {
		t.Fatalf("KMS Encrypt with encrypt on k8s: %v", err)
	}
	if st, err := kms.Status(t.Context(), &kmsapi.StatusRequest{}); err != nil || st.Healthz != "ok" {
		t.Errorf("KMS Status with encrypt: %+v %v", st, err)
	}
	_, err = kms.Decrypt(t.Context(), &kmsapi.DecryptRequest{Uid: "u", Ciphertext: ct, KeyId: server.KMSKeyID("k8s", 1)})
	denied("KMS Decrypt without decrypt", err)

	grant(`["other"]`, "[encrypt, decrypt]")
	if err := az.Reload(); err != nil {
		t.Fatal(err)
	}
	_, err = encrypt()
	denied("KMS Encrypt with encrypt on another tenant", err)
	denied("SignCheckpoint after audit-sign was withdrawn", sign())
}
