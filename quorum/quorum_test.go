package quorum_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/quorum"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

type operator struct {
	name   string
	vkey   string
	signer note.Signer
}

func newOperator(t testing.TB, name string, typ quorum.KeyType) operator {
	t.Helper()
	skey, vkey, err := quorum.GenerateKey(nil, name, typ)
	if err != nil {
		t.Fatal(err)
	}
	s, err := quorum.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	return operator{name: name, vkey: vkey, signer: s}
}

func policy(threshold int, ops ...operator) *quorum.Policy {
	p := &quorum.Policy{Threshold: threshold, MaxValidity: 72 * time.Hour}
	for _, o := range ops {
		p.Operators = append(p.Operators, quorum.Operator{Name: o.name, Key: o.vkey})
	}
	return p
}

func shred(tenant string) quorum.Operation {
	return quorum.Operation{Kind: quorum.KindShredTenant, Params: map[string]string{"tenant": tenant}}
}

// request returns the text of a request for op created at t0, valid for d.
func request(t testing.TB, op quorum.Operation, d time.Duration) []byte {
	t.Helper()
	r := quorum.NewRequest(op, t0.Add(d), nil)
	r.Created = t0
	text, err := r.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	return text
}

func approve(t testing.TB, b []byte, ops ...operator) []byte {
	t.Helper()
	for _, o := range ops {
		var err error
		if b, err = quorum.Approve(b, o.signer); err != nil {
			t.Fatalf("%s approves: %v", o.name, err)
		}
	}
	return b
}

// team is alice and carol on Ed25519, bob on ML-DSA-44.
func team(t testing.TB) (alice, bob, carol operator) {
	return newOperator(t, "alice", quorum.KeyEd25519), newOperator(t, "bob", quorum.KeyMLDSA44), newOperator(t, "carol", quorum.KeyEd25519)
}

func wantTooFew(t *testing.T, err error, valid, needed int) {
	t.Helper()
	var tf *quorum.TooFewApprovalsError
	if !errors.Is(err, quorum.ErrTooFewApprovals) || !errors.As(err, &tf) || tf.Valid != valid || tf.Needed != needed {
		t.Fatalf("got %v, want ErrTooFewApprovals with %d valid of %d", err, valid, needed)
	}
}

func TestApproveThreshold(t *testing.T) {
	alice, bob, carol := team(t)
	p := policy(2, alice, bob, carol)
	req := request(t, shred("billing"), 24*time.Hour)
	now := t0.Add(time.Hour)

	_, err := p.Verify(req, shred("billing"), now)
	wantTooFew(t, err, 0, 2)
	_, err = p.Verify(approve(t, req, alice), shred("billing"), now)
	wantTooFew(t, err, 1, 2)

	a, err := p.Verify(approve(t, req, alice, bob), shred("billing"), now)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(a.Approvers, ",") != "alice,bob" || len(a.Nonce) != 32 || a.Request.Op.Params["tenant"] != "billing" {
		t.Fatalf("approval %+v", a)
	}
	if _, err := policy(3, alice, bob, carol).Verify(approve(t, req, alice, bob, carol), shred("billing"), now); err != nil {
		t.Fatalf("3 of 3 (Ed25519 and ML-DSA mixed): %v", err)
	}
}

func TestApproveSameOperatorTwiceCountsOnce(t *testing.T) {
	alice, bob, carol := team(t)
	p := policy(2, alice, bob, carol)
	req := request(t, shred("billing"), 24*time.Hour)

	// Approving again replaces the operator's signature.
	twice := approve(t, req, bob, bob)
	if n := bytes.Count(twice, []byte("\n— bob ")); n != 1 {
		t.Fatalf("%d bob signature lines after approving twice, want 1", n)
	}
	_, err := p.Verify(twice, shred("billing"), t0)
	wantTooFew(t, err, 1, 2)

	// Two different valid ML-DSA signatures by bob, pasted into one file.
	other := approve(t, req, bob)
	line := other[bytes.LastIndex(other, []byte("— bob ")):]
	if bytes.Contains(twice, line) {
		t.Fatal("ML-DSA signatures should be randomized")
	}
	_, err = p.Verify(append(bytes.Clone(twice), line...), shred("billing"), t0)
	wantTooFew(t, err, 1, 2)
}

func TestApproveUnknownSignerIgnored(t *testing.T) {
	alice, bob, carol := team(t)
	mallory := newOperator(t, "mallory", quorum.KeyEd25519)
	// An unregistered key under a registered name is unknown too.
	fakeBob := newOperator(t, "bob", quorum.KeyMLDSA44)
	p := policy(2, alice, bob, carol)
	req := request(t, shred("billing"), 24*time.Hour)

	_, err := p.Verify(approve(t, req, mallory, fakeBob, alice), shred("billing"), t0)
	wantTooFew(t, err, 1, 2)
	_, err = p.Verify(approve(t, req, mallory), shred("billing"), t0)
	wantTooFew(t, err, 0, 2)

	a, err := p.Verify(approve(t, req, mallory, alice, carol), shred("billing"), t0)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(a.Approvers, ",") != "alice,carol" || strings.Join(a.Ignored, ",") != "mallory" {
		t.Fatalf("approvers %v, ignored %v", a.Approvers, a.Ignored)
	}
}

func TestApproveExpiry(t *testing.T) {
	alice, bob, _ := team(t)
	p := policy(2, alice, bob)
	op := shred("billing")
	ok := approve(t, request(t, op, 24*time.Hour), alice, bob)

	if _, err := p.Verify(ok, op, t0.Add(24*time.Hour-time.Second)); err != nil {
		t.Fatalf("a second before expiry: %v", err)
	}
	for _, now := range []time.Time{t0.Add(24 * time.Hour), t0.Add(100 * time.Hour)} {
		if _, err := p.Verify(ok, op, now); !errors.Is(err, quorum.ErrExpired) {
			t.Fatalf("at %v: %v, want ErrExpired", now, err)
		}
	}
	long := approve(t, request(t, op, 73*time.Hour), alice, bob)
	if _, err := p.Verify(long, op, t0); !errors.Is(err, quorum.ErrValidityTooLong) {
		t.Fatalf("valid 73h under a 72h policy: %v, want ErrValidityTooLong", err)
	}
	// Created "now" by a clock far ahead: within MaxValidity of its
	// creation, but not of the verifier's now.
	future := approve(t, request(t, op, 48*time.Hour), alice, bob)
	if _, err := p.Verify(future, op, t0.Add(-48*time.Hour)); !errors.Is(err, quorum.ErrValidityTooLong) {
		t.Fatalf("request from the future: %v, want ErrValidityTooLong", err)
	}
}

func TestApproveWrongOperationRefused(t *testing.T) {
	alice, bob, _ := team(t)
	p := policy(2, alice, bob)
	approved := approve(t, request(t, shred("billing"), time.Hour), alice, bob)
	for _, want := range []quorum.Operation{
		shred("payroll"),
		{Kind: quorum.KindDestroyRoot, Params: map[string]string{"tenant": "billing"}},
		{Kind: quorum.KindShredTenant, Params: map[string]string{"tenant": "billing", "force": "true"}},
	} {
		if _, err := p.Verify(approved, want, t0); !errors.Is(err, quorum.ErrWrongOperation) {
			t.Errorf("approval of shred billing presented for %s: %v, want ErrWrongOperation", want, err)
		}
	}
}

func TestApproveReplayRefused(t *testing.T) {
	alice, bob, _ := team(t)
	p := policy(2, alice, bob)
	op := shred("billing")
	path := filepath.Join(t.TempDir(), "spent.json")
	ctx := context.Background()
	// FileSpent reads the wall clock: verify at a time the request is valid.
	now := time.Now()
	r := quorum.NewRequest(op, now.Add(time.Hour), nil)
	text, err := r.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	approved := approve(t, text, alice, bob)

	if _, err := p.Authorize(ctx, quorum.NewFileSpent(path), approved, op, now); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authorize(ctx, quorum.NewFileSpent(path), approved, op, now); !errors.Is(err, quorum.ErrReplayed) {
		t.Fatalf("second use: %v, want ErrReplayed", err)
	}
	// Reopened: the nonce is on disk.
	s := quorum.NewFileSpent(path)
	if err := s.Spend(ctx, r.Nonce, r.Expires); !errors.Is(err, quorum.ErrReplayed) {
		t.Fatalf("after reopening: %v, want ErrReplayed", err)
	}
	// For another operation it fails before reaching Spend.
	if _, err := p.Authorize(ctx, s, approved, shred("payroll"), now); !errors.Is(err, quorum.ErrWrongOperation) {
		t.Fatalf("for another operation: %v, want ErrWrongOperation", err)
	}
}

func TestApproveTamperedRequestRefused(t *testing.T) {
	alice, bob, _ := team(t)
	p := policy(2, alice, bob)
	approved := approve(t, request(t, shred("billing"), time.Hour), alice, bob)

	// Edited text: the digest and hash lines no longer match.
	for _, edit := range [][2]string{
		{"param tenant billing", "param tenant payroll"},
		{"expires 2026-03-01T13:00:00Z", "expires 2026-03-01T14:00:00Z"},
		{"kind shred-tenant", "kind destroy-root"},
	} {
		b := bytes.Replace(approved, []byte(edit[0]), []byte(edit[1]), 1)
		if bytes.Equal(b, approved) {
			t.Fatalf("%q not in the request", edit[0])
		}
		if _, err := p.Verify(b, shred("billing"), t0); !errors.Is(err, quorum.ErrMalformedRequest) {
			t.Errorf("edit %q: %v, want ErrMalformedRequest", edit[1], err)
		}
	}

	// A consistent new request with the old signatures: each operator's
	// signature fails (Ed25519 over the text, ML-DSA over the hash line).
	for _, o := range []operator{alice, bob} {
		one := approve(t, request(t, shred("billing"), time.Hour), o)
		sigs := one[bytes.Index(one, []byte("\n\n")):]
		forged := append(request(t, shred("payroll"), time.Hour), sigs[1:]...)
		_, err := p.Verify(forged, shred("payroll"), t0)
		if !errors.Is(err, quorum.ErrInvalidSignature) || !strings.Contains(err.Error(), o.name) {
			t.Errorf("%s's signature moved to another request: %v, want ErrInvalidSignature naming %s", o.name, err, o.name)
		}
	}
}

func TestApproveMergeSeparateCopies(t *testing.T) {
	alice, bob, carol := team(t)
	p := policy(3, alice, bob, carol)
	req := request(t, shred("billing"), time.Hour)
	a, b, c := approve(t, req, alice), approve(t, req, bob), approve(t, req, carol)

	merged, err := quorum.Merge(a, b, c, a, req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.Verify(merged, shred("billing"), t0)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got.Approvers, ",") != "alice,bob,carol" {
		t.Fatalf("approvers %v", got.Approvers)
	}
	if n := bytes.Count(merged, []byte("\n— alice ")); n != 1 {
		t.Fatalf("%d alice lines, want 1", n)
	}
	if m, err := quorum.Merge(req, req); err != nil || !bytes.Equal(m, req) {
		t.Fatalf("merging unsigned copies: %q, %v", m, err)
	}
	other := approve(t, request(t, shred("billing"), time.Hour), bob) // another nonce
	if _, err := quorum.Merge(a, other); !errors.Is(err, quorum.ErrMergeMismatch) {
		t.Fatalf("merging different requests: %v, want ErrMergeMismatch", err)
	}
}

func TestApproveRefusesNonRequest(t *testing.T) {
	alice, _, _ := team(t)
	for _, b := range []string{"", "hello\n", "example.com/log\n1\nAAAA\n"} {
		if _, err := quorum.Approve([]byte(b), alice.signer); !errors.Is(err, quorum.ErrMalformedRequest) {
			t.Errorf("Approve(%q): %v, want ErrMalformedRequest", b, err)
		}
	}
}
