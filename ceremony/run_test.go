package ceremony

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/quorum"
	"github.com/hsmd/hsmd/softhsm"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// token opens a fresh SoftHSM token without root keys.
func token(t *testing.T) (*hsm.HSM, string) {
	t.Helper()
	tok := softhsm.NewTestToken(t)
	h, err := hsm.Open(context.Background(), hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Error(err)
		}
	})
	return h, tok.Label
}

// rig is a ceremony room: five custodians (three X25519, two post-quantum
// hybrid age identities), three quorum operators (threshold 2), files in
// one directory.
type rig struct {
	t      *testing.T
	dir    string
	ids    []string // identity files
	recips []string
	policy *quorum.Policy
	skeys  []string
	spent  quorum.Spent
	now    time.Time
}

func newRig(t *testing.T) *rig {
	r := &rig{t: t, dir: t.TempDir(), now: time.Now()}
	for i := range 5 {
		var id, rc string
		if i < 3 {
			x, err := age.GenerateX25519Identity()
			if err != nil {
				t.Fatal(err)
			}
			id, rc = x.String(), x.Recipient().String()
		} else {
			x, err := age.GenerateHybridIdentity()
			if err != nil {
				t.Fatal(err)
			}
			id, rc = x.String(), x.Recipient().String()
		}
		p := filepath.Join(r.dir, fmt.Sprintf("custodian%d.key", i+1))
		if err := os.WriteFile(p, []byte(id+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		r.ids, r.recips = append(r.ids, p), append(r.recips, rc)
	}
	r.policy = &quorum.Policy{Threshold: 2, MaxValidity: 24 * time.Hour}
	for i, typ := range []quorum.KeyType{quorum.KeyEd25519, quorum.KeyMLDSA44, quorum.KeyEd25519} {
		name := fmt.Sprintf("op%d", i+1)
		skey, vkey, err := quorum.GenerateKey(nil, name, typ)
		if err != nil {
			t.Fatal(err)
		}
		r.skeys = append(r.skeys, skey)
		r.policy.Operators = append(r.policy.Operators, quorum.Operator{Name: name, Key: vkey})
	}
	if err := r.policy.Validate(); err != nil {
		t.Fatal(err)
	}
	r.spent = quorum.NewFileSpent(filepath.Join(r.dir, "spent.json"))
	return r
}

func (r *rig) env(h *hsm.HSM, label string) *Env {
	return &Env{
		HSM: h, TokenLabel: label,
		Approve: func(ctx context.Context, file string, op quorum.Operation) (*quorum.Approval, error) {
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, err
			}
			return r.policy.Authorize(ctx, r.spent, b, op, r.now)
		},
	}
}

// write writes a ceremony file and parses it.
func (r *rig) write(name, yaml string) *File {
	r.t.Helper()
	p := filepath.Join(r.dir, name)
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		r.t.Fatal(err)
	}
	f, err := Load(p)
	if err != nil {
		r.t.Fatalf("%s: %v", name, err)
	}
	return f
}

// approve writes an approval request for f's operation signed by the
// first n operators, expiring in validity.
func (r *rig) approve(f *File, file string, n int, validity time.Duration) {
	r.t.Helper()
	op, ok := f.Operation()
	if !ok {
		r.t.Fatalf("%s needs no approval", f.Ceremony)
	}
	text, err := quorum.NewRequest(op, r.now.Add(validity), nil).MarshalText()
	if err != nil {
		r.t.Fatal(err)
	}
	for _, sk := range r.skeys[:n] {
		s, err := quorum.NewSigner(sk)
		if err != nil {
			r.t.Fatal(err)
		}
		if text, err = quorum.Approve(text, s); err != nil {
			r.t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(r.dir, file), text, 0o600); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rig) rootInitYAML(id string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ceremony: root-init\nid: %s\ncustody:\n  threshold: 3\n  custodians:\n", id)
	for i, rc := range r.recips {
		fmt.Fprintf(&b, "    - name: custodian%d\n      recipient: %s\n      output: %s-share%d.age\n", i+1, rc, id, i+1)
	}
	fmt.Fprintf(&b, "transcript: %s.transcript\n", id)
	return b.String()
}

func (r *rig) restoreYAML(id, expect string, shares ...int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ceremony: restore\nid: %s\nexpect: %s\napprovals: %s.approval\ntranscript: %s.transcript\nshares:\n", id, expect, id, id)
	for _, i := range shares {
		fmt.Fprintf(&b, "  - file: init-share%d.age\n    identity: custodian%d.key\n", i, i)
	}
	return b.String()
}

// sealOn encrypts with the token's roots as hsmd's data plane does.
func sealOn(t *testing.T, h *hsm.HSM, ref envelope.KeyRef, msgs ...string) [][]byte {
	t.Helper()
	eng, err := envelope.New(envelope.Config{Deriver: h})
	if err != nil {
		t.Fatal(err)
	}
	items := make([]envelope.Item, len(msgs))
	for i, m := range msgs {
		items[i] = envelope.Item{Plaintext: []byte(m), Context: map[string]string{"i": fmt.Sprint(i)}}
	}
	cts, err := eng.Seal(context.Background(), ref, items)
	if err != nil {
		t.Fatal(err)
	}
	return cts
}

func openOn(t *testing.T, h *hsm.HSM, ref envelope.KeyRef, cts [][]byte) []string {
	t.Helper()
	eng, err := envelope.New(envelope.Config{Deriver: h})
	if err != nil {
		t.Fatal(err)
	}
	in := make([]envelope.Ciphertext, len(cts))
	for i, c := range cts {
		in[i] = envelope.Ciphertext{Data: c, Context: map[string]string{"i": fmt.Sprint(i)}}
	}
	res, err := eng.Open(context.Background(), func(context.Context, uint64, uint32) (envelope.KeyRef, error) { return ref, nil }, in)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]string, len(res))
	for i, o := range res {
		if o.Err != nil {
			t.Fatalf("item %d: %v", i, o.Err)
		}
		out[i] = string(o.Plaintext)
	}
	return out
}

func sha(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestRootInitCustodyRestore: a 3-of-5 root-init, a restore from three
// shares onto a fresh token (ciphertexts of the first token decrypt
// through the second), and what must be refused on the way.
func TestRootInitCustodyRestore(t *testing.T) {
	ctx := context.Background()
	r := newRig(t)
	h1, l1 := token(t)
	init := r.write("init.yaml", r.rootInitYAML("init"))
	steps, err := Plan(ctx, init, r.env(h1, l1))
	if err != nil || len(steps) < 8 {
		t.Fatalf("plan: %v %q", err, steps)
	}
	if vs, _ := h1.RootVersions(ctx); len(vs) != 0 {
		t.Fatalf("plan changed the token: %v", vs)
	}
	tr, err := Run(ctx, init, r.env(h1, l1))
	if err != nil {
		t.Fatalf("root-init: %v", err)
	}
	if tr.Custody == nil || tr.Custody.Threshold != 3 || len(tr.Keys) != 4 {
		t.Fatalf("transcript %+v", tr)
	}
	for _, label := range hsm.RootKeyLabels() {
		ki, err := h1.KeyInfo(ctx, label)
		if err != nil || !ki.Sensitive || ki.Extractable {
			t.Fatalf("%s: %+v %v", label, ki, err)
		}
	}
	ref := envelope.KeyRef{Tenant: "billing", TenantID: 7, Version: 1, KDKVersion: 1}
	copy(ref.Salt[:], "0123456789abcdef0123456789abcdef")
	msgs := []string{"first", "second", "third"}
	cts := sealOn(t, h1, ref, msgs...)

	// A rerun is refused and overwrites nothing.
	before := sha(t, filepath.Join(r.dir, "init-share1.age"))
	if _, err := Run(ctx, init, r.env(h1, l1)); !errors.Is(err, ErrRefused) {
		t.Fatalf("rerun: %v", err)
	}
	if sha(t, filepath.Join(r.dir, "init-share1.age")) != before {
		t.Fatal("the rerun changed a share file")
	}

	// Two shares are refused.
	h2, l2 := token(t)
	two := r.write("two.yaml", r.restoreYAML("two", "init.transcript", 1, 4))
	r.approve(two, "two.approval", 2, time.Hour)
	if _, err := Run(ctx, two, r.env(h2, l2)); !errors.Is(err, ErrTooFewShares) {
		t.Fatalf("restore from 2 shares: %v", err)
	}
	// An altered share is named.
	share3 := filepath.Join(r.dir, "init-share3.age")
	orig, _ := os.ReadFile(share3)
	alt := bytes.Replace(orig, []byte("\n"), []byte("\nA"), 3)
	os.WriteFile(share3, alt, 0o600)
	bad := r.write("bad.yaml", r.restoreYAML("bad", "init.transcript", 1, 3, 5))
	r.approve(bad, "bad.approval", 2, time.Hour)
	_, err = Run(ctx, bad, r.env(h2, l2))
	if err == nil || !strings.Contains(err.Error(), "init-share3.age") {
		t.Fatalf("restore with an altered share: %v", err)
	}
	os.WriteFile(share3, orig, 0o600)
	if vs, _ := h2.RootVersions(ctx); len(vs) != 0 {
		t.Fatalf("refused restores left keys: %v", vs)
	}

	// Quorum: one approval is too few; an approval of another ceremony and
	// an expired one are refused.
	res := r.write("restore.yaml", r.restoreYAML("restore", "init.transcript", 2, 4, 5))
	r.approve(res, "restore.approval", 1, time.Hour)
	var few *quorum.TooFewApprovalsError
	if _, err := Run(ctx, res, r.env(h2, l2)); !errors.As(err, &few) {
		t.Fatalf("restore with 1 of 2 approvals: %v", err)
	}
	os.WriteFile(filepath.Join(r.dir, "restore.approval"), mustRead(t, filepath.Join(r.dir, "two.approval")), 0o600)
	if _, err := Run(ctx, res, r.env(h2, l2)); !errors.Is(err, quorum.ErrWrongOperation) {
		t.Fatalf("restore with another ceremony's approval: %v", err)
	}
	r.approve(res, "restore.approval", 2, time.Hour)
	r.now = r.now.Add(2 * time.Hour)
	if _, err := Run(ctx, res, r.env(h2, l2)); !errors.Is(err, quorum.ErrExpired) {
		t.Fatalf("restore with an expired approval: %v", err)
	}
	r.now = r.now.Add(-2 * time.Hour)

	// M approvals: the restore runs; the first token's ciphertexts open
	// through the second.
	r.approve(res, "restore.approval", 2, time.Hour)
	rt, err := Run(ctx, res, r.env(h2, l2))
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if rt.Approval == nil || len(rt.Approval.Approvers) != 2 {
		t.Fatalf("approval record %+v", rt.Approval)
	}
	for _, label := range hsm.RootKeyLabels() {
		ki, err := h2.KeyInfo(ctx, label)
		if err != nil || !ki.Sensitive || ki.Extractable {
			t.Fatalf("restored %s: %+v %v", label, ki, err)
		}
	}
	if got := openOn(t, h2, ref, cts); strings.Join(got, ",") != strings.Join(msgs, ",") {
		t.Fatalf("decrypted %q on the restored token", got)
	}
	// The same approval again, for the same ceremony on another fresh
	// token: replayed.
	h3, l3 := token(t)
	os.Remove(filepath.Join(r.dir, "restore.transcript"))
	if _, err := Run(ctx, res, r.env(h3, l3)); !errors.Is(err, quorum.ErrReplayed) {
		t.Fatalf("replayed approval: %v", err)
	}

	// A kdk rotation with custody on the first token, then restored onto
	// the second (which has the v1 roots): data under kdk v2 opens there.
	var kb strings.Builder
	fmt.Fprintf(&kb, "ceremony: rotate-kdk\nid: kdk2\nversion: 2\napprovals: kdk2.approval\ntranscript: kdk2.transcript\ncustody:\n  threshold: 2\n  custodians:\n")
	for i := range 3 {
		fmt.Fprintf(&kb, "    - name: custodian%d\n      recipient: %s\n      output: kdk2-share%d.age\n", i+1, r.recips[i], i+1)
	}
	kdk2 := r.write("kdk2.yaml", kb.String())
	r.approve(kdk2, "kdk2.approval", 2, time.Hour)
	if _, err := Run(ctx, kdk2, r.env(h1, l1)); err != nil {
		t.Fatalf("rotate-kdk: %v", err)
	}
	ref2 := ref
	ref2.KDKVersion, ref2.Version = 2, 2
	cts2 := sealOn(t, h1, ref2, "under kdk v2")
	rk := r.write("rk.yaml", "ceremony: restore\nid: rk\nversion: 2\nexpect: kdk2.transcript\napprovals: rk.approval\ntranscript: rk.transcript\nshares:\n"+
		"  - file: kdk2-share1.age\n    identity: custodian1.key\n  - file: kdk2-share3.age\n    identity: custodian3.key\n")
	r.approve(rk, "rk.approval", 2, time.Hour)
	if _, err := Run(ctx, rk, r.env(h2, l2)); err != nil {
		t.Fatalf("restore of kdk v2: %v", err)
	}
	if vs, _ := h2.RootVersions(ctx); len(vs[hsm.KindKDK]) != 2 || len(vs[hsm.KindWrap]) != 1 {
		t.Fatalf("versions after restoring kdk v2: %v", vs)
	}
	if got := openOn(t, h2, ref2, cts2); got[0] != "under kdk v2" {
		t.Fatalf("kdk v2 data on the second token: %q", got)
	}

	// Transcripts verify, and a changed byte fails them.
	tb := mustRead(t, filepath.Join(r.dir, "init.transcript"))
	if _, self, err := VerifyTranscript(tb, nil); err != nil || !self {
		t.Fatalf("transcript: %v", err)
	}
	if _, _, err := VerifyTranscript(tb, tr.Signers); err != nil {
		t.Fatalf("transcript with its keys: %v", err)
	}
	for i := range tb {
		b := bytes.Clone(tb)
		b[i] ^= 0x01
		if _, _, err := VerifyTranscript(b, tr.Signers); err == nil {
			t.Fatalf("transcript byte %d changed: verifies", i)
		}
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCeremonyFileStrict: unknown keys and bad values are refused, naming
// the YAML path.
func TestCeremonyFileStrict(t *testing.T) {
	r := newRig(t)
	good := r.rootInitYAML("x")
	for _, c := range []struct{ yaml, path string }{
		{good + "colour: blue\n", "colour"},
		{strings.Replace(good, "      output: x-share2.age\n", "      output: x-share2.age\n      outptu: y\n", 1), "custody.custodians[1].outptu"},
		{strings.Replace(good, "threshold: 3", "threshold: 9", 1), "custody.threshold"},
		{strings.Replace(good, "threshold: 3", "threshold: three", 1), "custody.threshold"},
		{strings.Replace(good, r.recips[2], "ssh-ed25519 AAAA", 1), "custody.custodians[2].recipient"},
		{strings.Replace(good, "ceremony: root-init", "ceremony: root-nit", 1), "ceremony"},
		{strings.Replace(good, "id: x", "id: ../x", 1), "id"},
		{good + "transcript: again\n", "transcript"},
	} {
		_, err := Parse([]byte(c.yaml), r.dir)
		var pe *PathError
		if !errors.As(err, &pe) || pe.Path != c.path {
			t.Errorf("want an error at %q, got %v", c.path, err)
		}
	}
}
