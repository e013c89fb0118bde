package server_test

import (
	"bytes"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/internal/testutil"
	"github.com/hsmd/hsmd/server"
)

// kmsPlugin serves the stack's KMS v2 plugin for tenant on its own unix
// socket and grpc.Server (built with the server's options, as the daemon
// does), and returns a client of it.
func (s *stack) kmsPlugin(tenant string) kmsapi.KeyManagementServiceClient {
	t := s.t
	t.Helper()
	g := grpc.NewServer(s.srv.ServerOptions()...)
	if err := s.srv.RegisterKMSv2(g, tenant); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(s.dir, "kms-"+tenant+".sock"))
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	conn, err := grpc.NewClient("unix://"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); g.Stop() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

func kmsStatus(t *testing.T, c kmsapi.KeyManagementServiceClient) *kmsapi.StatusResponse {
	t.Helper()
	st, err := c.Status(context.Background(), &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func kmsEncrypt(t *testing.T, c kmsapi.KeyManagementServiceClient, pt []byte) *kmsapi.EncryptResponse {
	t.Helper()
	r, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Uid: "uid-1", Plaintext: pt})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func kmsDecrypt(t *testing.T, c kmsapi.KeyManagementServiceClient, r *kmsapi.EncryptResponse, want []byte) {
	t.Helper()
	d, err := c.Decrypt(context.Background(), &kmsapi.DecryptRequest{Uid: "uid-2", Ciphertext: r.Ciphertext, KeyId: r.KeyId})
	if err != nil {
		t.Fatalf("decrypt (key id %s): %v", r.KeyId, err)
	}
	if !bytes.Equal(d.Plaintext, want) {
		t.Fatalf("decrypted %x, want %x", d.Plaintext, want)
	}
}

// TestKMSv2RoundTripAndRotation: Status names the current version, Encrypt
// and Decrypt round-trip a 32-byte data key, and after a rotation key_id
// changes in Status and Encrypt while old ciphertexts still decrypt.
func TestKMSv2RoundTripAndRotation(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("k8s")
	c := s.kmsPlugin("k8s")
	st := kmsStatus(t, c)
	if st.Version != "v2" || st.Healthz != "ok" || st.KeyId != "hsmd:k8s:v1" {
		t.Fatalf("status %+v", st)
	}
	dek := bytes.Repeat([]byte{0xd7}, 32)
	old := kmsEncrypt(t, c, dek)
	if old.KeyId != st.KeyId {
		t.Fatalf("encrypt key id %q, status %q", old.KeyId, st.KeyId)
	}
	kmsDecrypt(t, c, old, dek)

	if _, err := s.keys.RotateKey(context.Background(), &hsmdv1.RotateKeyRequest{Tenant: "k8s"}); err != nil {
		t.Fatal(err)
	}
	if st := kmsStatus(t, c); st.KeyId != "hsmd:k8s:v2" || st.Healthz != "ok" {
		t.Fatalf("status after rotation %+v", st)
	}
	cur := kmsEncrypt(t, c, dek)
	if cur.KeyId != "hsmd:k8s:v2" {
		t.Fatalf("encrypt after rotation: key id %q", cur.KeyId)
	}
	kmsDecrypt(t, c, cur, dek)
	kmsDecrypt(t, c, old, dek)
	// The key ID in the request is not trusted: the ciphertext names its version.
	kmsDecrypt(t, c, &kmsapi.EncryptResponse{Ciphertext: old.Ciphertext, KeyId: "hsmd:k8s:v2"}, dek)

	if _, err := s.kmsPlugin("nobody").Status(context.Background(), &kmsapi.StatusRequest{}); status.Code(err) != codes.NotFound {
		t.Fatalf("status of a missing tenant: %v, want NOT_FOUND", err)
	}
	if err := s.srv.RegisterKMSv2(grpc.NewServer(), "bad name"); err == nil {
		t.Fatal("RegisterKMSv2 accepted an invalid tenant name")
	}
}

// TestKMSv2BadCiphertext: every ciphertext the tenant's keys do not open
// (tampered, truncated, garbage, another tenant's, an Envelope item of the
// same tenant) gets the one INVALID_ARGUMENT error; sizes out of the API's
// bounds are refused naming the limit.
func TestKMSv2BadCiphertext(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("k8s")
	s.createTenant("other")
	c := s.kmsPlugin("k8s")
	good := kmsEncrypt(t, c, make([]byte, 32)).Ciphertext
	tampered := bytes.Clone(good)
	tampered[len(tampered)-1] ^= 1
	otherTenant := kmsEncrypt(t, s.kmsPlugin("other"), make([]byte, 32)).Ciphertext
	envItem := encrypt(t, s, "k8s", &hsmdv1.EncryptItem{Plaintext: make([]byte, 32)})[0]
	ctx := context.Background()
	var msg string
	for name, ct := range map[string][]byte{
		"tampered": tampered, "truncated": good[:20], "garbage": bytes.Repeat([]byte{1}, 90),
		"other tenant": otherTenant, "envelope item": envItem,
	} {
		_, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Uid: "u", Ciphertext: ct, KeyId: "hsmd:k8s:v1"})
		st, _ := status.FromError(err)
		if st.Code() != codes.InvalidArgument {
			t.Fatalf("%s: %v, want INVALID_ARGUMENT", name, err)
		}
		if msg == "" {
			msg = st.Message()
		}
		if st.Message() != msg {
			t.Fatalf("%s: message %q, want the one message %q", name, st.Message(), msg)
		}
	}
	for name, ct := range map[string][]byte{"empty": nil, "over 1 KiB": make([]byte, server.KMSMaxCiphertext+1)} {
		_, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Uid: "u", Ciphertext: ct})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "kms_max_ciphertext") {
			t.Fatalf("decrypt %s: %v", name, err)
		}
	}
}

// TestKMSv2Sizes: the API's bounds hold (ciphertext and key ID at most
// 1 KiB), at the longest tenant name and the largest plaintext.
func TestKMSv2Sizes(t *testing.T) {
	s := newStack(t, stackOpts{})
	long := strings.Repeat("t", 64)
	s.createTenant(long)
	c := s.kmsPlugin(long)
	r := kmsEncrypt(t, c, make([]byte, 32))
	if len(r.Ciphertext) != 32+58 || len(r.KeyId) > 1024 || len(kmsStatus(t, c).KeyId) > 1024 {
		t.Fatalf("ciphertext %d bytes, key id %d bytes", len(r.Ciphertext), len(r.KeyId))
	}
	max := make([]byte, server.KMSMaxPlaintext)
	if r := kmsEncrypt(t, c, max); len(r.Ciphertext) != server.KMSMaxCiphertext {
		t.Fatalf("largest plaintext: ciphertext %d bytes", len(r.Ciphertext))
	} else {
		kmsDecrypt(t, c, r, max)
	}
	for _, n := range []int{0, server.KMSMaxPlaintext + 1} {
		_, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Uid: "u", Plaintext: make([]byte, n)})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "kms_max_plaintext") {
			t.Fatalf("encrypt %d bytes: %v", n, err)
		}
	}
}

// TestKMSv2StatusHSMFailing: with the token gone, Status reports a healthz
// other than "ok" (the key ID stays), and Encrypt of a new key is
// UNAVAILABLE.
func TestKMSv2StatusHSMFailing(t *testing.T) {
	s, f := faultyStack(t)
	s.createTenant("k8s")
	c := s.kmsPlugin("k8s")
	if st := kmsStatus(t, c); st.Healthz != "ok" {
		t.Fatalf("healthy status %+v", st)
	}
	f.fail.Store(pkcs11.CKR_TOKEN_NOT_PRESENT)
	if _, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Uid: "u", Plaintext: make([]byte, 32)}); status.Code(err) != codes.Unavailable {
		t.Fatalf("encrypt with the token gone: %v, want UNAVAILABLE", err)
	}
	st := kmsStatus(t, c)
	if st.Healthz == "ok" || st.KeyId != "hsmd:k8s:v1" || st.Version != "v2" {
		t.Fatalf("status with the token gone: %+v", st)
	}
}

// TestKMSv2AuditFailingAndRecorded: KMS calls are audit entries like any
// other call, naming the plugin's tenant; while the audit log refuses entries, Status is refused with
// UNAVAILABLE (the API server's healthz fails), as Encrypt is.
func TestKMSv2AuditFailingAndRecorded(t *testing.T) {
	s := newStack(t, stackOpts{audit: true})
	ctx := context.Background()
	s.createTenant("k8s")
	c := s.kmsPlugin("k8s")
	if st := kmsStatus(t, c); st.Healthz != "ok" {
		t.Fatalf("status %+v", st)
	}
	dek := make([]byte, 32)
	kmsDecrypt(t, c, kmsEncrypt(t, c, dek), dek)

	undo := testutil.MakeUnwritable(t, s.auditDir())
	if _, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "k8s"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("RotateKey with the audit log unwritable: %v", err)
	}
	// Status is a health probe: not refused, it reports the failure.
	if st, err := c.Status(ctx, &kmsapi.StatusRequest{}); err != nil || st.Healthz == "ok" || !strings.Contains(st.Healthz, "audit") {
		t.Fatalf("status with the audit log failing: %+v %v, want a healthz naming the audit log", st, err)
	}
	if _, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "u", Plaintext: dek}); status.Code(err) != codes.Unavailable {
		t.Fatalf("encrypt with the audit log failing: %v, want UNAVAILABLE", err)
	}
	undo()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := c.Status(ctx, &kmsapi.StatusRequest{})
		if err == nil && st.Healthz == "ok" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status after the log recovered: %v %v", st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.stop()
	var methods []string
	for _, e := range s.auditEntries() {
		if e.Kind == "rpc" {
			if !strings.HasPrefix(e.Caller, "unix:uid=") || e.RequestID == "" || e.Code != "OK" || e.Tenant != "k8s" || e.Items != 1 {
				t.Fatalf("entry %+v", e)
			}
			methods = append(methods, e.Method)
		}
	}
	// Status probes are not audited; Encrypt and Decrypt are.
	if strings.Join(methods, ",") != "Encrypt,Decrypt" {
		t.Fatalf("audited KMS calls %v, want Encrypt,Decrypt", methods)
	}
}
