package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/internal/testutil"
	"github.com/hsmd/hsmd/signing"
)

const auditTestOrigin = "hsmd.test/cmd-audit"

// auditFixture is a real audit log under <dataDir>/audit, signed by
// software Ed25519, ECDSA P-256 and ML-DSA-44 keys.
type auditFixture struct {
	dataDir string
	signers []note.Signer
	vkeys   []string
}

func (f *auditFixture) dir() string { return filepath.Join(f.dataDir, auditDirName) }

// auditSoftSigners returns the three kinds of signer hsmd uses, over
// software keys, all named origin, and their verifier keys.
func auditSoftSigners(t *testing.T, origin string) ([]note.Signer, []string) {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rand.Reader, origin)
	if err != nil {
		t.Fatal(err)
	}
	ed, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := signing.NewNoteSigner(origin, k)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := signing.GenerateMLDSA(nil)
	if err != nil {
		t.Fatal(err)
	}
	ml, err := signing.NewMLDSASigner(origin, priv)
	if err != nil {
		t.Fatal(err)
	}
	return []note.Signer{ed, ec, ml}, []string{vkey, ec.VerifierKey(), ml.VerifierKey()}
}

// newAuditFixture makes a log of n entries (request IDs r0, r1, ...) and
// its verifiers file.
func newAuditFixture(t *testing.T, n int) *auditFixture {
	t.Helper()
	audit.QuietTessera() // before any log runs
	s, v := auditSoftSigners(t, auditTestOrigin)
	f := &auditFixture{dataDir: t.TempDir(), signers: s, vkeys: v}
	l := f.open(t)
	f.append(t, l, 0, n)
	f.close(t, l)
	if err := audit.WriteVerifiers(f.dir(), f.vkeys); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *auditFixture) open(t *testing.T) *audit.Log {
	t.Helper()
	l, err := audit.Open(context.Background(), audit.Config{Dir: f.dir(), Signers: f.signers,
		CheckpointInterval: 100 * time.Millisecond, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (f *auditFixture) append(t *testing.T, l *audit.Log, from, n int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		e := audit.Entry{Kind: audit.KindRPC, Method: "Encrypt", Tenant: "t", RequestID: fmt.Sprintf("r%d", i), Code: "OK"}
		if err := l.Append(context.Background(), e, true); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
}

func (f *auditFixture) close(t *testing.T, l *audit.Log) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// run runs `hsmd audit <sub> --data-dir <dataDir> args...` in process.
func (f *auditFixture) run(t *testing.T, sub string, args ...string) cliResult {
	t.Helper()
	return runCLI(t, "", nil, append([]string{"audit", sub, "--data-dir", f.dataDir}, args...)...)
}

func auditKeyFlags(keys ...string) []string {
	var out []string
	for _, k := range keys {
		out = append(out, "--key", k)
	}
	return out
}

func TestAuditVerify(t *testing.T) {
	f := newAuditFixture(t, 12)
	r := f.run(t, "verify")
	if r.code != 0 || !strings.Contains(r.stdout, "size:        12\n") || !strings.Contains(r.stdout, "root hash:") {
		t.Fatalf("verify = %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "hsmd: warning: verifier keys read from") || !strings.Contains(r.stderr, "internal consistency") {
		t.Fatalf("verify without --key does not warn that the data dir vouches for itself: %s", r.stderr)
	}
	t.Logf("hsmd audit verify:\n%s%s", r.stdout, r.stderr)

	r = f.run(t, "verify", auditKeyFlags(f.vkeys...)...)
	if r.code != 0 || !strings.Contains(r.stdout, "entries:     12\n") || strings.Contains(r.stderr, "warning") {
		t.Fatalf("verify --key ×3 = %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if r := f.run(t, "verify", auditKeyFlags(f.vkeys[2])...); r.code != 0 {
		t.Fatalf("verify with the ML-DSA key alone = %d: %s", r.code, r.stderr)
	}
}

func TestAuditVerifyRefusesOtherKeys(t *testing.T) {
	f := newAuditFixture(t, 3)
	_, otherOrigin := auditSoftSigners(t, "other.example/log")
	_, sameOrigin := auditSoftSigners(t, auditTestOrigin)
	for name, keys := range map[string][]string{
		"another origin":                {otherOrigin[0]},
		"another key, same origin":      {sameOrigin[1]},
		"the log's keys and another PQ": {f.vkeys[0], f.vkeys[1], sameOrigin[2]},
	} {
		r := f.run(t, "verify", auditKeyFlags(keys...)...)
		if r.code != 1 || !strings.Contains(r.stderr, "hsmd: error: audit verify: checkpoint #0:") {
			t.Errorf("%s: verify = %d\nstdout:\n%s\nstderr:\n%s", name, r.code, r.stdout, r.stderr)
		}
	}
	// --require-all=false: one key verifying every checkpoint is enough.
	r := f.run(t, "verify", append(auditKeyFlags(sameOrigin[2], f.vkeys[2]), "--require-all=false")...)
	if r.code != 0 || !strings.Contains(r.stdout, "at least one of 2 keys") || !strings.Contains(r.stderr, "missing a required signature") {
		t.Fatalf("verify --require-all=false = %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	if r := f.run(t, "verify", "--key", "not a key"); r.code != 2 {
		t.Fatalf("verify with a malformed key = %d: %s", r.code, r.stderr)
	}
}

func TestAuditVerifyNamesTamperedEntry(t *testing.T) {
	f := newAuditFixture(t, 20)
	bundle := filepath.Join(f.dir(), audit.TreeDir, "tile", "entries", "000.p", "20")
	b, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, []byte(`"request_id":"r13"`))
	if i < 0 {
		t.Fatal("entry r13 not in the bundle")
	}
	b[i+len(`"request_id":"r1`)] = '4' // r13 → r14: still a valid entry
	if err := os.WriteFile(bundle, b, 0o600); err != nil {
		t.Fatal(err)
	}
	r := f.run(t, "verify", auditKeyFlags(f.vkeys...)...)
	if r.code != 1 || !strings.Contains(r.stderr, "hsmd: error: audit verify: entry 13:") || r.stdout != "" {
		t.Fatalf("verify of a tampered log = %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("hsmd audit verify of a tampered log:\n%s", r.stderr)
}

// auditTailSeqs parses JSON lines of entries and returns their indexes.
func auditTailSeqs(t *testing.T, out string) []uint64 {
	t.Helper()
	var seqs []uint64
	for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if line == "" {
			continue
		}
		var e struct {
			Index     *uint64 `json:"index"`
			Kind      string  `json:"kind"`
			RequestID string  `json:"request_id"`
		}
		if err := json.Unmarshal([]byte(line), &e); err != nil || e.Index == nil || e.Kind == "" {
			t.Fatalf("tail line %q: %v", line, err)
		}
		if e.RequestID != fmt.Sprintf("r%d", *e.Index) {
			t.Fatalf("tail line %q: request ID does not match its index", line)
		}
		seqs = append(seqs, *e.Index)
	}
	return seqs
}

func auditSeqRange(from, to uint64) []uint64 {
	var out []uint64
	for i := from; i < to; i++ {
		out = append(out, i)
	}
	return out
}

func TestAuditTail(t *testing.T) {
	f := newAuditFixture(t, 15)
	for _, c := range []struct {
		args []string
		want []uint64
	}{
		{nil, auditSeqRange(5, 15)},
		{[]string{"-n", "3"}, auditSeqRange(12, 15)},
		{[]string{"-n", "100"}, auditSeqRange(0, 15)},
		{[]string{"-n", "0"}, nil},
		{[]string{"--from", "7"}, auditSeqRange(7, 15)},
		{[]string{"--from", "7", "-n", "2"}, auditSeqRange(7, 9)},
		{[]string{"--from", "20"}, nil},
	} {
		r := f.run(t, "tail", c.args...)
		if r.code != 0 {
			t.Fatalf("tail %v = %d: %s", c.args, r.code, r.stderr)
		}
		if got := auditTailSeqs(t, r.stdout); fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("tail %v printed seqs %v, want %v", c.args, got, c.want)
		}
	}
}

// auditWaitFor polls cond for up to 15s.
func auditWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAuditTailFollow(t *testing.T) {
	f := newAuditFixture(t, 4)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errb testutil.SyncBuffer
	env := &cliEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, getenv: func(string) string { return "" }}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, env, []string{"audit", "tail", "--data-dir", f.dataDir, "-f", "-n", "2", "--poll", "50ms"})
	}()
	auditWaitFor(t, "the last 2 entries", func() bool { return strings.Count(out.String(), "\n") == 2 })

	l := f.open(t)
	f.append(t, l, 4, 1)
	auditWaitFor(t, "the entry appended while following", func() bool { return strings.Count(out.String(), "\n") >= 3 })
	f.close(t, l)
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("tail -f exited %d: %s", code, errb.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("tail -f did not stop when its context was cancelled")
	}
	if got := auditTailSeqs(t, out.String()); fmt.Sprint(got) != fmt.Sprint(auditSeqRange(2, 5)) {
		t.Fatalf("tail -f printed seqs %v, want [2 3 4]", got)
	}
}

func TestAuditProve(t *testing.T) {
	f := newAuditFixture(t, 9)
	for _, args := range [][]string{{"7"}, append(auditKeyFlags(f.vkeys...), "7")} {
		r := f.run(t, "prove", args...)
		if r.code != 0 {
			t.Fatalf("prove %v = %d: %s", args, r.code, r.stderr)
		}
		var p audit.Proof
		if err := json.Unmarshal([]byte(r.stdout), &p); err != nil {
			t.Fatalf("prove printed %q: %v", r.stdout, err)
		}
		leaf := rfc6962.DefaultHasher.HashLeaf([]byte(p.Entry))
		if err := proof.VerifyInclusion(rfc6962.DefaultHasher, 7, p.TreeSize, leaf, p.Hashes, p.Root); err != nil {
			t.Fatalf("the printed proof does not verify: %v", err)
		}
		if p.Index != 7 || p.TreeSize != 9 || !strings.Contains(p.Entry, `"request_id":"r7"`) {
			t.Fatalf("proof %+v", p)
		}
		vs, err := audit.ParseVerifiers(f.vkeys)
		if err != nil {
			t.Fatal(err)
		}
		if err := signing.Verify([]byte(p.Checkpoint), vs...); err != nil {
			t.Fatalf("the proof's checkpoint: %v", err)
		}
	}
	_, other := auditSoftSigners(t, auditTestOrigin)
	if r := f.run(t, "prove", append(auditKeyFlags(other[0]), "3")...); r.code != 1 {
		t.Fatalf("prove under a foreign key = %d: %s", r.code, r.stderr)
	}
	if r := f.run(t, "prove", "9"); r.code != 1 || !strings.Contains(r.stderr, "entry 9 is not in the newest checkpoint") {
		t.Fatalf("prove past the end = %d: %s", r.code, r.stderr)
	}
	if r := f.run(t, "prove", "x"); r.code != 2 {
		t.Fatalf("prove x = %d: %s", r.code, r.stderr)
	}
}

func TestAuditKeys(t *testing.T) {
	f := newAuditFixture(t, 1)
	r := f.run(t, "keys")
	if r.code != 0 {
		t.Fatalf("keys = %d: %s", r.code, r.stderr)
	}
	t.Logf("hsmd audit keys:\n%s", r.stdout)
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	types := []string{"# Ed25519 (0x01)", "# ECDSA P-256 (0x02)", "# ML-DSA-44 cosignature/v1 (0x06)"}
	if len(lines) != 2*len(types) {
		t.Fatalf("keys printed:\n%s", r.stdout)
	}
	for i, typ := range types {
		if !strings.HasPrefix(lines[2*i], typ+", name "+auditTestOrigin+", key hash ") || lines[2*i+1] != f.vkeys[i] {
			t.Errorf("key %d printed as\n%s\n%s\nwant %s ...\n%s", i, lines[2*i], lines[2*i+1], typ, f.vkeys[i])
		}
	}
}

func TestAuditUsage(t *testing.T) {
	for _, args := range [][]string{{"audit"}, {"audit", "bogus"}} {
		r := runCLI(t, "", nil, args...)
		if r.code != 2 || !strings.Contains(r.stderr, "verify") || !strings.Contains(r.stderr, "tail") ||
			!strings.Contains(r.stderr, "prove N") || !strings.Contains(r.stderr, "keys") {
			t.Errorf("%v = %d: %s", args, r.code, r.stderr)
		}
	}
	if r := runCLI(t, "", nil, "audit", "verify"); r.code != 2 || !strings.Contains(r.stderr, "--data-dir") {
		t.Errorf("verify without a data dir = %d: %s", r.code, r.stderr)
	}
	r := runCLI(t, "", nil, "audit", "keys", "--data-dir", t.TempDir())
	if r.code != 1 || !strings.Contains(r.stderr, "no audit log in") || !strings.Contains(r.stderr, "hsmd: hint:") {
		t.Errorf("keys on an empty data dir = %d: %s", r.code, r.stderr)
	}
}
