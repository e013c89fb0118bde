package server_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/internal/grpccodec"
	"github.com/hsmd/hsmd/internal/testutil"
)

func (s *stack) auditDir() string { return filepath.Join(s.dir, "audit") }

func (s *stack) auditEntries() []*audit.Entry {
	s.t.Helper()
	var out []*audit.Entry
	for e, err := range audit.Entries(context.Background(), s.auditDir(), 0, ^uint64(0)) {
		if err != nil {
			s.t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// TestAuditRecordsCalls: every call is an entry (a batch is one), key
// management is a durable request/response pair plus a key event, callers
// are named, contexts appear only as HMACs, and nothing secret is stored.
func TestAuditRecordsCalls(t *testing.T) {
	s := newStack(t, stackOpts{audit: true})
	ctx := context.Background()
	s.createTenant("billing")
	secret := []byte("PLAINTEXT-MUST-NOT-BE-LOGGED")
	items := make([]*hsmdv1.EncryptItem, 100)
	for i := range items {
		items[i] = &hsmdv1.EncryptItem{Plaintext: secret, Context: map[string]string{"row": "CONTEXT-VALUE-" + string(rune('a'+i%3))}}
	}
	enc, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "billing", Items: items})
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(enc.Ciphertexts[1])
	bad[len(bad)-1] ^= 1
	if _, err := s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "billing", Items: []*hsmdv1.DecryptItem{
		{Ciphertext: enc.Ciphertexts[0], Context: items[0].Context}, {Ciphertext: bad, Context: items[1].Context}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "billing"}); err != nil {
		t.Fatal(err)
	}
	// Over TCP too.
	if _, err := hsmdv1.NewKeysClient(s.tcp).GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: "billing"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "nobody"}); status.Code(err) != codes.NotFound {
		t.Fatalf("rotate unknown tenant: %v", err)
	}
	s.stop()

	rep, err := audit.Verify(ctx, s.auditDir(), parseVerifiers(t, s.vkeys))
	if err != nil {
		t.Fatalf("audit verify: %v", err)
	}
	es := s.auditEntries()
	type row struct{ kind, method, op, tenant, code string }
	var got []row
	for _, e := range es {
		got = append(got, row{e.Kind, e.Method, e.Op, e.Tenant, e.Code})
	}
	want := []row{
		{"request", "CreateTenant", "", "billing", ""},
		{"response", "CreateTenant", "", "billing", "OK"},
		{"rpc", "Encrypt", "", "billing", "OK"},
		{"rpc", "Decrypt", "", "billing", "OK"},
		{"request", "RotateKey", "", "billing", ""},
		{"key_event", "", "rotate", "billing", ""},
		{"response", "RotateKey", "", "billing", "OK"},
		{"rpc", "GetKey", "", "billing", "OK"},
		{"request", "RotateKey", "", "nobody", ""},
		{"response", "RotateKey", "", "nobody", "NOT_FOUND"},
	}
	if len(got) != len(want) || rep.Size != uint64(len(want)) {
		t.Fatalf("entries (%d, verified size %d):\n%v\nwant\n%v", len(got), rep.Size, got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	encE, decE, rotE, getE := es[2], es[3], es[5], es[7]
	if encE.Items != 100 || len(encE.KeyVersions) != 1 || encE.KeyVersions[0] != 1 || len(encE.Contexts) != 3 {
		t.Fatalf("Encrypt entry %+v", encE)
	}
	if decE.Items != 2 || decE.FailedItems != 1 || len(decE.Contexts) != 2 || decE.Contexts[0] != encE.Contexts[0] {
		t.Fatalf("Decrypt entry %+v", decE)
	}
	if len(rotE.KeyVersions) != 1 || rotE.KeyVersions[0] != 2 {
		t.Fatalf("key event %+v", rotE)
	}
	if !strings.HasPrefix(es[0].Caller, "unix:uid=") || !strings.HasPrefix(getE.Caller, "tcp:127.0.0.1:") {
		t.Fatalf("callers %q %q", es[0].Caller, getE.Caller)
	}
	for i, e := range es {
		if e.RequestID == "" || e.Time.IsZero() || e.Seq != uint64(i) {
			t.Fatalf("entry %d: %+v", i, e)
		}
	}
	// Nothing secret anywhere in the audit directory.
	filepath.Walk(s.auditDir(), func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		b, _ := os.ReadFile(p)
		for _, leak := range [][]byte{secret, []byte("CONTEXT-VALUE"), enc.Ciphertexts[0][42:]} {
			if bytes.Contains(b, leak) {
				t.Errorf("%s holds %q", p, leak)
			}
		}
		return nil
	})
}

func parseVerifiers(t testing.TB, vkeys []string) []note.Verifier {
	t.Helper()
	vs, err := audit.ParseVerifiers(vkeys)
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

// TestAuditCheckpointsIndependentVerifiers: the checkpoints signed inside
// the HSM (Ed25519, ECDSA P-256) and by the ML-DSA-44 key sealed under the
// wrap key are accepted by verifiers that are not hsmd's: x/mod's note for
// Ed25519, transparency-dev/formats for ECDSA and ML-DSA; proofs verify
// with transparency-dev/merkle.
func TestAuditCheckpointsIndependentVerifiers(t *testing.T) {
	s := newStack(t, stackOpts{audit: true})
	ctx := context.Background()
	s.createTenant("t")
	time.Sleep(200 * time.Millisecond) // a checkpoint at this size
	for range 5 {
		if _, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "t", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}}); err != nil {
			t.Fatal(err)
		}
	}
	s.stop()
	cp, err := os.ReadFile(filepath.Join(s.auditDir(), audit.TreeDir, "checkpoint"))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.vkeys) != 3 {
		t.Fatalf("vkeys %v", s.vkeys)
	}
	edV, err := note.NewVerifier(s.vkeys[0])
	if err != nil {
		t.Fatal(err)
	}
	ecV, err := tnote.NewECDSAVerifier(s.vkeys[1])
	if err != nil {
		t.Fatal(err)
	}
	mlV, err := tnote.NewMLDSAVerifier(s.vkeys[2])
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]note.Verifier{"x/mod Ed25519": edV, "formats ECDSA": ecV, "formats ML-DSA": mlV} {
		n, err := note.Open(cp, note.VerifierList(v))
		if err != nil || len(n.Sigs) != 1 {
			t.Fatalf("%s: %v", name, err)
		}
		if !strings.HasPrefix(n.Text, "hsmd.test/audit\n7\n") {
			t.Fatalf("checkpoint text %q", n.Text)
		}
	}
	p, err := audit.Prove(ctx, s.auditDir(), 3, parseVerifiers(t, s.vkeys))
	if err != nil {
		t.Fatal(err)
	}
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, 3, p.TreeSize, rfc6962.DefaultHasher.HashLeaf([]byte(p.Entry)), p.Hashes, p.Root); err != nil {
		t.Fatal(err)
	}
}

// TestAuditFailClosed: with the audit log unwritable, data-plane and key
// calls fail with UNAVAILABLE (a key change is not made), nothing hangs;
// once the log is writable again, calls succeed.
func TestAuditFailClosed(t *testing.T) {
	s := newStack(t, stackOpts{audit: true})
	ctx := context.Background()
	s.createTenant("t")
	undo := testutil.MakeUnwritable(t, s.auditDir())
	enc := func() error {
		_, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "t", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
		return err
	}
	start := time.Now()
	if _, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "t"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("RotateKey with the audit log unwritable: %v", err)
	}
	if err := enc(); status.Code(err) != codes.Unavailable {
		t.Fatalf("Encrypt with the audit log failing: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("refusals took %v", d)
	}
	waitHealth(t, healthpb.NewHealthClient(s.conn), healthpb.HealthCheckResponse_NOT_SERVING)
	undo()
	deadline := time.Now().Add(10 * time.Second)
	for enc() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("calls still fail after the log recovered: %v", enc())
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitHealth(t, healthpb.NewHealthClient(s.conn), healthpb.HealthCheckResponse_SERVING)
	k, err := s.keys.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: "t"})
	if err != nil || k.CurrentVersion != 1 {
		t.Fatalf("the refused rotation happened: %v %v", k, err)
	}
	s.stop()
	// Every response sealed in advance was sent or released.
	if n := grpccodec.Pending(); n != 0 {
		t.Fatalf("%d prepared responses neither sent nor released", n)
	}
	if _, err := audit.Verify(ctx, s.auditDir(), parseVerifiers(t, s.vkeys)); err != nil {
		t.Fatal(err)
	}
}
