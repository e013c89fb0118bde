package server_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/server"
)

func encrypt(t *testing.T, s *stack, tenant string, items ...*hsmdv1.EncryptItem) [][]byte {
	t.Helper()
	resp, err := s.env.Encrypt(context.Background(), &hsmdv1.EncryptRequest{Tenant: tenant, Items: items})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Ciphertexts) != len(items) {
		t.Fatalf("%d ciphertexts for %d items", len(resp.Ciphertexts), len(items))
	}
	return resp.Ciphertexts
}

func decrypt(t *testing.T, s *stack, tenant string, items ...*hsmdv1.DecryptItem) []*hsmdv1.DecryptResult {
	t.Helper()
	resp, err := s.env.Decrypt(context.Background(), &hsmdv1.DecryptRequest{Tenant: tenant, Items: items})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Results) != len(items) {
		t.Fatalf("%d results for %d items", len(resp.Results), len(items))
	}
	return resp.Results
}

func TestRoundTripOverGRPC(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	for _, n := range []int{0, 1, 1024, 1 << 20} {
		pt := make([]byte, n)
		rand.Read(pt)
		ctx := map[string]string{"size": fmt.Sprint(n)}
		cts := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: pt, Context: ctx})
		res := decrypt(t, s, "", &hsmdv1.DecryptItem{Ciphertext: cts[0], Context: ctx})
		if res[0].Error != nil || !bytes.Equal(res[0].Plaintext, pt) {
			t.Fatalf("%d bytes: %v", n, res[0].Error)
		}
	}
	// A batch of 10,000.
	items := make([]*hsmdv1.EncryptItem, 10_000)
	for i := range items {
		items[i] = &hsmdv1.EncryptItem{Plaintext: []byte(fmt.Sprintf("record-%d", i))}
	}
	cts := encrypt(t, s, "acme", items...)
	in := make([]*hsmdv1.DecryptItem, len(cts))
	for i := range cts {
		in[i] = &hsmdv1.DecryptItem{Ciphertext: cts[i]}
	}
	for i, r := range decrypt(t, s, "acme", in...) {
		if r.Error != nil || !bytes.Equal(r.Plaintext, items[i].Plaintext) {
			t.Fatalf("item %d: %v", i, r.Error)
		}
	}
}

// TestBadCiphertextsFailAlone: tenant A's ciphertext as tenant B, with
// another context, and after every single-bit flip fails with the one
// authentication error (a flip in the version or suite byte: malformed),
// while the good items of the same batch succeed.
func TestBadCiphertextsFailAlone(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("a")
	s.createTenant("b")
	c := map[string]string{"k": "v"}
	a := encrypt(t, s, "a", &hsmdv1.EncryptItem{Plaintext: []byte("x"), Context: c}, &hsmdv1.EncryptItem{Plaintext: []byte("good-a")})
	b := encrypt(t, s, "b", &hsmdv1.EncryptItem{Plaintext: []byte("good-b")})

	res := decrypt(t, s, "b", &hsmdv1.DecryptItem{Ciphertext: b[0]}, &hsmdv1.DecryptItem{Ciphertext: a[0], Context: c})
	wantOK(t, "b's own item", res[0], "good-b")
	wantReason(t, "a's ciphertext as tenant b", res[1], server.ReasonDecryptFailed)

	good := &hsmdv1.DecryptItem{Ciphertext: a[1]}
	batch := []*hsmdv1.DecryptItem{good, {Ciphertext: a[0], Context: map[string]string{"k": "w"}}, {Ciphertext: a[0]}}
	for bit := 0; bit < len(a[0])*8; bit++ {
		f := bytes.Clone(a[0])
		f[bit/8] ^= 1 << (bit % 8)
		batch = append(batch, &hsmdv1.DecryptItem{Ciphertext: f, Context: c})
	}
	batch = append(batch, &hsmdv1.DecryptItem{Ciphertext: []byte("garbage")}, good)
	res = decrypt(t, s, "", batch...)
	wantOK(t, "first good item", res[0], "good-a")
	wantOK(t, "last good item", res[len(res)-1], "good-a")
	wantReason(t, "other context", res[1], server.ReasonDecryptFailed)
	wantReason(t, "no context", res[2], server.ReasonDecryptFailed)
	for bit := 0; bit < len(a[0])*8; bit++ {
		want := server.ReasonDecryptFailed
		if bit < 16 {
			want = server.ReasonMalformed
		}
		wantReason(t, fmt.Sprintf("bit %d", bit), res[3+bit], want)
	}
	wantReason(t, "garbage", res[len(res)-2], server.ReasonMalformed)
	if msg := res[1].Error.Message; msg != "message authentication failed" {
		t.Errorf("authentication failure says %q: it must say nothing more", msg)
	}
}

func wantOK(t *testing.T, name string, r *hsmdv1.DecryptResult, pt string) {
	t.Helper()
	if r.Error != nil || string(r.Plaintext) != pt {
		t.Errorf("%s: %v %q", name, r.Error, r.Plaintext)
	}
}

func wantReason(t *testing.T, name string, r *hsmdv1.DecryptResult, reason string) {
	t.Helper()
	if r.Error == nil || r.Error.Reason != reason || codes.Code(r.Error.Code) != codes.InvalidArgument || len(r.Plaintext) != 0 {
		t.Errorf("%s: got %v, want INVALID_ARGUMENT/%s", name, r.Error, reason)
	}
}

// TestHSMCallsPer100kItems: 100,000 items for one tenant cost at most 2
// HSM calls, as the hsmd_hsm_calls_total metric counts them.
func TestHSMCallsPer100kItems(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	before := s.hsmCalls()
	items := make([]*hsmdv1.EncryptItem, 10_000)
	for i := range items {
		items[i] = &hsmdv1.EncryptItem{Plaintext: []byte("0123456789abcdef")}
	}
	var last [][]byte
	for range 10 {
		last = encrypt(t, s, "acme", items...)
	}
	in := make([]*hsmdv1.DecryptItem, len(last))
	for i := range last {
		in[i] = &hsmdv1.DecryptItem{Ciphertext: last[i]}
	}
	decrypt(t, s, "acme", in...)
	calls := s.hsmCalls() - before
	t.Logf("100,000 items encrypted and 10,000 decrypted: %v HSM calls", calls)
	if calls < 1 || calls > 2 {
		t.Fatalf("%v HSM calls, want 1 or 2", calls)
	}
}

func TestRestartKeepsDecrypting(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	c := map[string]string{"app": "billing"}
	cts := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("before restart"), Context: c})
	s.restart(stackOpts{})
	res := decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: cts[0], Context: c},
		&hsmdv1.DecryptItem{Ciphertext: []byte(wire.EncodeText(cts[0])), Context: c})
	wantOK(t, "binary", res[0], "before restart")
	wantOK(t, "text form", res[1], "before restart")
	if s.hsmCalls() != 1 {
		t.Fatalf("after a restart the key must be derived again: %v calls", s.hsmCalls())
	}
}

func TestRootKeysAreNotExtractable(t *testing.T) {
	s := newStack(t, stackOpts{})
	for _, label := range hsm.RootKeyLabels() {
		info, err := s.hsm.KeyInfo(context.Background(), label)
		if err != nil {
			t.Fatal(err)
		}
		if !info.Sensitive || info.Extractable || info.ValueReadable {
			t.Errorf("%s: sensitive=%v extractable=%v value readable=%v", label, info.Sensitive, info.Extractable, info.ValueReadable)
		}
	}
}

func TestRequestErrors(t *testing.T) {
	s := newStack(t, stackOpts{limits: server.Limits{MaxBatchItems: 3, MaxItemBytes: 100, MaxRequestBytes: 250, MaxContextBytes: 64}})
	s.createTenant("acme")
	ctx := context.Background()
	item := func(n int) *hsmdv1.EncryptItem { return &hsmdv1.EncryptItem{Plaintext: make([]byte, n)} }
	for _, tc := range []struct {
		name  string
		req   *hsmdv1.EncryptRequest
		code  codes.Code
		words string
	}{
		{"unknown tenant", &hsmdv1.EncryptRequest{Tenant: "nobody", Items: []*hsmdv1.EncryptItem{item(1)}}, codes.NotFound, "nobody"},
		{"no tenant", &hsmdv1.EncryptRequest{Items: []*hsmdv1.EncryptItem{item(1)}}, codes.InvalidArgument, "tenant"},
		{"no items", &hsmdv1.EncryptRequest{Tenant: "acme"}, codes.InvalidArgument, "items"},
		{"too many items", &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{item(1), item(1), item(1), item(1)}}, codes.InvalidArgument, "max_batch_items"},
		{"item too big", &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{item(101)}}, codes.InvalidArgument, "max_item_bytes"},
		{"request too big", &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{item(100), item(100), item(100)}}, codes.InvalidArgument, "max_request_bytes"},
		{"context too big", &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{{Context: map[string]string{"k": strings.Repeat("v", 64)}}}}, codes.InvalidArgument, "max_context_bytes"},
	} {
		_, err := s.env.Encrypt(ctx, tc.req)
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.words) {
			t.Errorf("%s: got %v, want %v naming %q", tc.name, err, tc.code, tc.words)
		}
	}
	_, err := s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "nobody", Items: []*hsmdv1.DecryptItem{{Ciphertext: make([]byte, 60)}}})
	if status.Code(err) != codes.NotFound {
		t.Errorf("decrypt for an unknown tenant: %v", err)
	}
	_, err = s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Items: []*hsmdv1.DecryptItem{{Ciphertext: make([]byte, 100+wire.Overhead+1)}}})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "max_item_bytes") {
		t.Errorf("decrypt of an oversized item: %v", err)
	}
}

// TestDecryptSpanningTooManyKeys: a batch whose items name more data keys
// than envelope.max_key_groups is refused before any HSM call.
func TestDecryptSpanningTooManyKeys(t *testing.T) {
	s := newStack(t, stackOpts{limits: server.Limits{MaxBatchItems: 2000}})
	s.createTenant("acme")
	ct := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("x")})[0]
	before := s.hsmCalls()
	var items []*hsmdv1.DecryptItem
	for range envelope.DefaultMaxGroups + 1 {
		f := bytes.Clone(ct)
		rand.Read(f[14:30]) // the seed
		items = append(items, &hsmdv1.DecryptItem{Ciphertext: f})
	}
	_, err := s.env.Decrypt(context.Background(), &hsmdv1.DecryptRequest{Items: items})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "max_key_groups") {
		t.Fatalf("got %v", err)
	}
	if s.hsmCalls() != before {
		t.Fatal("the refused batch cost HSM calls")
	}
}
