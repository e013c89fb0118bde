package audit

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera/api/layout"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/internal/testutil"
	"github.com/hsmd/hsmd/signing"
	"github.com/hsmd/hsmd/softhsm"
)

func TestMain(m *testing.M) {
	QuietTessera()
	os.Exit(softhsm.RunTests(m))
}

const testOrigin = "hsmd.test/audit"

// softSigners returns an Ed25519, an ECDSA P-256 and an ML-DSA-44 signer
// (software keys; hsm_test.go uses the HSM's) and their verifier keys.
func softSigners(t testing.TB) ([]note.Signer, []string) {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rand.Reader, testOrigin)
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
	ec, err := signing.NewNoteSigner(testOrigin, k)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := signing.GenerateMLDSA(nil)
	if err != nil {
		t.Fatal(err)
	}
	ml, err := signing.NewMLDSASigner(testOrigin, priv)
	if err != nil {
		t.Fatal(err)
	}
	return []note.Signer{ed, ec, ml}, []string{vkey, ec.VerifierKey(), ml.VerifierKey()}
}

type testLog struct {
	dir     string
	signers []note.Signer
	vkeys   []string
}

func newTestLog(t testing.TB) *testLog {
	s, v := softSigners(t)
	return &testLog{dir: t.TempDir(), signers: s, vkeys: v}
}

func (tl *testLog) open(t testing.TB, mod func(*Config)) *Log {
	t.Helper()
	cfg := Config{Dir: tl.dir, Signers: tl.signers, CheckpointInterval: 100 * time.Millisecond, Timeout: 2 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	l, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return l
}

func (tl *testLog) verifiers(t testing.TB) []note.Verifier {
	t.Helper()
	vs, err := ParseVerifiers(tl.vkeys)
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

func closeLog(t testing.TB, l *Log) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func appendN(t testing.TB, l *Log, from, n int, durable bool) {
	t.Helper()
	for i := range n {
		e := Entry{Kind: KindRPC, Method: "Encrypt", Tenant: "t", RequestID: fmt.Sprintf("r%d", from+i), Items: i, Code: "OK"}
		if err := l.Append(context.Background(), e, durable); err != nil {
			t.Fatalf("Append %d: %v", from+i, err)
		}
	}
}

func TestAppendVerifyReopen(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, nil)
	appendN(t, l, 0, 300, false)
	appendN(t, l, 300, 5, true)
	if got := l.Size(); got != 305 {
		t.Fatalf("Size after durable appends = %d, want 305", got)
	}
	closeLog(t, l)
	rep, err := Verify(context.Background(), tl.dir, tl.verifiers(t))
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if rep.Size != 305 || rep.Checkpoints < 2 || rep.Uncovered != 0 {
		t.Fatalf("report %+v", rep)
	}

	l = tl.open(t, nil)
	if l.Size() != 305 {
		t.Fatalf("reopened at size %d", l.Size())
	}
	appendN(t, l, 305, 10, true)
	closeLog(t, l)
	rep, err = Verify(context.Background(), tl.dir, tl.verifiers(t))
	if err != nil || rep.Size != 315 {
		t.Fatalf("Verify after reopen: %+v, %v", rep, err)
	}
	// Every entry is there once. The 300 appended without waiting may be
	// in another order (tessera may integrate a batch in two flushes in
	// either order); each durable one follows everything before it.
	var n uint64
	seen := make(map[string]bool)
	for e, err := range Entries(context.Background(), tl.dir, 0, ^uint64(0)) {
		if err != nil {
			t.Fatal(err)
		}
		if e.Seq != n || e.Time.IsZero() || seen[e.RequestID] {
			t.Fatalf("entry %d = %+v", n, e)
		}
		seen[e.RequestID] = true
		if n >= 300 && e.RequestID != fmt.Sprintf("r%d", n) {
			t.Fatalf("durable entry %d = %+v", n, e)
		}
		n++
	}
	if n != 315 || len(seen) != 315 || !seen["r0"] || !seen["r299"] {
		t.Fatalf("%d entries, %d distinct", n, len(seen))
	}
	// An inclusion proof checked independently with merkle/proof.
	p, err := Prove(context.Background(), tl.dir, 307, tl.verifiers(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, 307, p.TreeSize, rfc6962.DefaultHasher.HashLeaf([]byte(p.Entry)), p.Hashes, p.Root); err != nil {
		t.Fatalf("inclusion proof: %v", err)
	}
	if !strings.Contains(p.Entry, `"request_id":"r307"`) {
		t.Fatalf("proved entry %s", p.Entry)
	}
}

// TestVerifyDemandsEveryVerifier: a checkpoint is refused if one of the
// demanded signatures (here the post-quantum one) is missing.
func TestVerifyDemandsEveryVerifier(t *testing.T) {
	tl := newTestLog(t)
	classical := tl.signers[:2]
	l, err := Open(context.Background(), Config{Dir: tl.dir, Signers: classical, CheckpointInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 0, 3, true)
	closeLog(t, l)
	if _, err := Verify(context.Background(), tl.dir, tl.verifiers(t)[:2]); err != nil {
		t.Fatalf("classical verifiers: %v", err)
	}
	_, err = Verify(context.Background(), tl.dir, tl.verifiers(t))
	var ve *VerifyError
	if !errors.As(err, &ve) || ve.Checkpoint != 0 || !errors.Is(err, err) || !strings.Contains(err.Error(), "missing a required signature") {
		t.Fatalf("Verify demanding ML-DSA = %v", err)
	}
}

// TestTamperingIsCaught changes bytes of every stored entry and checkpoint,
// one at a time, and of the hash tiles, and expects Verify to name a bad
// entry or checkpoint each time: every byte, except inside the base64 of
// the signatures (3 KiB for ML-DSA-44), where every 7th and the last 4 are
// changed, to keep the test's time in bounds.
func TestTamperingIsCaught(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, nil)
	appendN(t, l, 0, 4, true)
	time.Sleep(150 * time.Millisecond) // let a checkpoint at size 4 publish
	appendN(t, l, 4, 3, true)
	closeLog(t, l)
	vs := tl.verifiers(t)
	if _, err := Verify(context.Background(), tl.dir, vs); err != nil {
		t.Fatalf("Verify before tampering: %v", err)
	}
	// What the tree of size 7 is made of (older partial tiles and bundles
	// that tessera has not collected yet are not part of it).
	files := []string{
		filepath.Join(tl.dir, CheckpointsFile),
		filepath.Join(tl.dir, TreeDir, "checkpoint"),
		filepath.Join(tl.dir, TreeDir, "tile", "entries", "000.p", "7"),
		filepath.Join(tl.dir, TreeDir, "tile", "0", "000.p", "7"),
	}
	// Each file in its own copy of the log, in parallel.
	var mu sync.Mutex
	kinds := map[string]int{}
	var wg sync.WaitGroup
	for _, f := range files {
		rel, _ := filepath.Rel(tl.dir, f)
		dir := t.TempDir()
		copyDir(t, tl.dir, dir)
		f = filepath.Join(dir, rel)
		orig, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		positions := flipPositions(orig)
		wg.Go(func() {
			b := append([]byte(nil), orig...)
			for _, i := range positions {
				b[i] ^= 0x01
				if err := os.WriteFile(f, b, 0o600); err != nil {
					t.Error(err)
					return
				}
				b[i] ^= 0x01
				_, err := Verify(context.Background(), dir, vs)
				var ve *VerifyError
				if !errors.As(err, &ve) {
					t.Errorf("%s byte %d changed: Verify = %v", rel, i, err)
					return
				}
			}
			mu.Lock()
			kinds[rel] = len(positions)
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(kinds) < 4 {
		t.Fatalf("tampered only %v", kinds)
	}
	t.Logf("bytes changed one at a time, each caught: %v", kinds)
}

// TestVerifyNamesTheBadEntry: an entry rewritten into another valid entry
// is named by its index.
func TestVerifyNamesTheBadEntry(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, nil)
	appendN(t, l, 0, 20, true)
	closeLog(t, l)
	bundle := filepath.Join(tl.dir, TreeDir, "tile", "entries", "000.p", "20")
	b, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	nb := strings.Replace(string(b), `"request_id":"r13"`, `"request_id":"x13"`, 1)
	if nb == string(b) {
		t.Fatal("entry r13 not found in the bundle")
	}
	if err := os.WriteFile(bundle, []byte(nb), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Verify(context.Background(), tl.dir, tl.verifiers(t))
	var ve *VerifyError
	if !errors.As(err, &ve) || ve.Entry != 13 {
		t.Fatalf("Verify = %v, want entry 13 named", err)
	}
}

// flipPositions lists the bytes of b to change: all, except inside the
// base64 of note signature lines, where every 7th and the last 4.
func flipPositions(b []byte) []int {
	var out []int
	lineStart := 0
	for i := 0; i < len(b); i++ {
		if b[i] != '\n' {
			continue
		}
		line := b[lineStart:i]
		sigStart := -1
		if strings.HasPrefix(string(line), "— ") {
			sigStart = lineStart + strings.LastIndexByte(string(line), ' ') + 1
		}
		for j := lineStart; j <= i; j++ {
			if sigStart < 0 || j < sigStart || j >= i-4 || (j-sigStart)%7 == 0 {
				out = append(out, j)
			}
		}
		lineStart = i + 1
	}
	for j := lineStart; j < len(b); j++ {
		out = append(out, j)
	}
	return out
}

// TestFailClosed: with the log unwritable, appends fail with
// ErrUnavailable within the timeout, none hangs; once it is writable
// again, appends succeed and nothing acknowledged is lost.
func TestFailClosed(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, func(c *Config) { c.Timeout = time.Second })
	appendN(t, l, 0, 3, true)
	undo := testutil.MakeUnwritable(t, tl.dir)

	start := time.Now()
	err := l.Append(context.Background(), Entry{Kind: KindRequest, Method: "RotateKey"}, true)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("durable Append on an unwritable log = %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("durable Append took %v", d)
	}
	if err := l.Err(); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Err() = %v", err)
	}
	if err := l.Append(context.Background(), Entry{Kind: KindRPC, Method: "Encrypt"}, false); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("batched Append while failing = %v", err)
	}

	undo()
	deadline := time.Now().Add(5 * time.Second)
	for l.Err() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("log did not recover: %v", l.Err())
		}
		time.Sleep(20 * time.Millisecond)
	}
	appendN(t, l, 3, 2, true)
	closeLog(t, l)
	rep, err := Verify(context.Background(), tl.dir, tl.verifiers(t))
	if err != nil {
		t.Fatal(err)
	}
	// 3 + the refused durable entry (kept and written once the log
	// recovered: the caller was told UNAVAILABLE) + 2.
	if rep.Size != 6 {
		t.Fatalf("size %d, want 6", rep.Size)
	}
}

// TestStuckWriterTimesOut: a writer stuck in a write (held here) makes a
// durable Append fail after Timeout instead of hanging, and a full queue
// refuses batched appends after Timeout.
func TestStuckWriterTimesOut(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, func(c *Config) { c.Timeout = 200 * time.Millisecond; c.QueueLimit = 4 })
	l.writeMu.Lock()
	start := time.Now()
	err := l.Append(context.Background(), Entry{Kind: KindRequest}, true)
	if !errors.Is(err, ErrUnavailable) || time.Since(start) > 2*time.Second {
		l.writeMu.Unlock()
		t.Fatalf("durable Append on a stuck log = %v after %v", err, time.Since(start))
	}
	var full error
	for i := 0; i < 10 && full == nil; i++ {
		full = l.Append(context.Background(), Entry{Kind: KindRPC}, false)
	}
	l.writeMu.Unlock()
	if !errors.Is(full, ErrUnavailable) {
		t.Fatalf("batched Append on a full queue = %v", full)
	}
	closeLog(t, l)
	if _, err := Verify(context.Background(), tl.dir, tl.verifiers(t)); err != nil {
		t.Fatal(err)
	}
}

func testMAC(msg []byte) [32]byte { return sha256.Sum256(append([]byte("k"), msg...)) }

func TestAnchor(t *testing.T) {
	ctx := context.Background()
	tl := newTestLog(t)
	l := tl.open(t, nil)
	if err := l.CheckAnchor(ctx, 3, testMAC, true); err != nil {
		t.Fatalf("a new log without an anchor: %v", err)
	}
	if err := l.CheckAnchor(ctx, 3, testMAC, false); !errors.Is(err, ErrAnchor) {
		t.Fatalf("a missing anchor where one is expected: %v", err)
	}
	appendN(t, l, 0, 5, true)
	if err := l.Bind(ctx, 4, testMAC); err != nil {
		t.Fatal(err)
	}
	closeLog(t, l)
	old := t.TempDir()
	copyDir(t, tl.dir, old)

	l = tl.open(t, nil)
	if err := l.CheckAnchor(ctx, 4, testMAC, false); err != nil {
		t.Fatalf("CheckAnchor at its counter: %v", err)
	}
	if err := l.CheckAnchor(ctx, 5, testMAC, false); !errors.Is(err, ErrAnchor) {
		t.Fatalf("CheckAnchor with the TPM ahead = %v", err)
	}
	appendN(t, l, 5, 300, true)
	if err := l.CheckAnchor(ctx, 4, testMAC, false); err != nil {
		t.Fatalf("CheckAnchor after growth: %v", err)
	}
	if err := l.Bind(ctx, 5, testMAC); err != nil {
		t.Fatal(err)
	}
	closeLog(t, l)
	newAnchor, err := os.ReadFile(filepath.Join(tl.dir, AnchorFile))
	if err != nil {
		t.Fatal(err)
	}

	// The log restored from the older copy, with the new anchor:
	// truncated.
	os.RemoveAll(tl.dir)
	copyDir(t, old, tl.dir)
	os.WriteFile(filepath.Join(tl.dir, AnchorFile), newAnchor, 0o600)
	l = tl.open(t, nil)
	if err := l.CheckAnchor(ctx, 5, testMAC, false); !errors.Is(err, ErrAnchor) || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("truncated log: %v", err)
	}
	// ... and with its own older anchor: rolled back.
	closeLog(t, l)
	copyDir(t, old, tl.dir)
	l = tl.open(t, nil)
	if err := l.CheckAnchor(ctx, 5, testMAC, false); !errors.Is(err, ErrAnchor) || !strings.Contains(err.Error(), "older copy") {
		t.Fatalf("rolled-back log: %v", err)
	}
	// An edited anchor, and another key.
	if err := l.CheckAnchor(ctx, 4, func(m []byte) [32]byte { return sha256.Sum256(m) }, false); !errors.Is(err, ErrAnchor) {
		t.Fatalf("anchor under another key: %v", err)
	}
	closeLog(t, l)
}

func copyDir(t testing.TB, from, to string) {
	t.Helper()
	if err := runCmd("cp", "-a", from+"/.", to); err != nil {
		t.Fatal(err)
	}
}

func TestContextHasher(t *testing.T) {
	if _, err := NewContextHasher(make([]byte, 16)); err == nil {
		t.Fatal("short key accepted")
	}
	h, err := NewContextHasher([]byte(strings.Repeat("k", 32)))
	if err != nil {
		t.Fatal(err)
	}
	a, b := h.Sum([]byte("a")), h.Sum([]byte("b"))
	if a == b || a != h.Sum([]byte("a")) || !strings.HasPrefix(a, "hmac-sha256:") {
		t.Fatalf("Sum: %q %q", a, b)
	}
	other, _ := NewContextHasher([]byte(strings.Repeat("j", 32)))
	if other.Sum([]byte("a")) == a {
		t.Fatal("the HMAC does not depend on the key")
	}
	if fmt.Sprintf("%v %#v", h, h) != "audit.ContextHasher{REDACTED} audit.ContextHasher{REDACTED}" {
		t.Fatal("the hasher prints its key")
	}
}

func runCmd(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %v: %v: %s", name, args, err, out)
	}
	return nil
}

// TestLinger: entries nobody waits for are gathered into one write while
// the writer lingers; a durable entry ends the lingering at once.
func TestLinger(t *testing.T) {
	tl := newTestLog(t)
	var mu sync.Mutex
	var writes []int
	l := tl.open(t, func(c *Config) {
		c.Linger = 2 * time.Second
		c.OnWrite = func(n int, _ time.Duration, _ error) {
			mu.Lock()
			writes = append(writes, n)
			mu.Unlock()
		}
	})
	appendN(t, l, 0, 10, false)
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	appendN(t, l, 10, 1, true)
	if d := time.Since(start); d > time.Second {
		t.Fatalf("a durable append waited %v behind the linger", d)
	}
	mu.Lock()
	got := append([]int(nil), writes...)
	mu.Unlock()
	if len(got) != 1 || got[0] != 11 {
		t.Fatalf("writes %v, want one of 11 entries", got)
	}
	closeLog(t, l)
}

// TestVerifyAcrossKeyRotation: after the classical signing keys rotate,
// the log verifies with the old and new keys listed together (one valid
// signature per key type), and not with the new keys alone.
func TestVerifyAcrossKeyRotation(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, nil)
	appendN(t, l, 0, 3, true)
	closeLog(t, l)
	newer, newKeys := softSigners(t)
	tl.signers = []note.Signer{newer[0], newer[1], tl.signers[2]} // ML-DSA kept
	l = tl.open(t, nil)
	appendN(t, l, 3, 3, true)
	closeLog(t, l)
	if err := WriteVerifiers(tl.dir, tl.vkeys); err != nil {
		t.Fatal(err)
	}
	if err := WriteVerifiers(tl.dir, []string{newKeys[0], newKeys[1], tl.vkeys[2]}); err != nil {
		t.Fatal(err)
	}
	all, err := ReadVerifiers(tl.dir)
	if err != nil || len(all) != 5 {
		t.Fatalf("verifiers file: %v %v", all, err)
	}
	vs, err := ParseVerifiers(all)
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := Verify(context.Background(), tl.dir, vs); err != nil || rep.Size != 6 {
		t.Fatalf("Verify with old and new keys: %+v %v", rep, err)
	}
	only, _ := ParseVerifiers([]string{newKeys[0], newKeys[1], tl.vkeys[2]})
	var ve *VerifyError
	if _, err := Verify(context.Background(), tl.dir, only); !errors.As(err, &ve) || ve.Checkpoint != 0 {
		t.Fatalf("Verify with the new keys only: %v", err)
	}
}

// TestVerifyPublishedBehind: a checkpoint archived but not yet published
// (a crash between the two, or hsmd publishing while Verify reads) and an
// incomplete record at the archive's end verify, and are reported; a
// published checkpoint that is not in the archive does not.
func TestVerifyPublishedBehind(t *testing.T) {
	tl := newTestLog(t)
	l := tl.open(t, nil)
	appendN(t, l, 0, 3, true)
	time.Sleep(250 * time.Millisecond) // a checkpoint of size 3
	appendN(t, l, 3, 3, true)
	closeLog(t, l)
	var notes [][]byte
	for cp, err := range readArchive(filepath.Join(tl.dir, CheckpointsFile)) {
		if err != nil {
			t.Fatal(err)
		}
		notes = append(notes, cp.Note)
	}
	if len(notes) < 2 {
		t.Fatalf("%d checkpoints archived, want at least 2", len(notes))
	}
	pubPath := filepath.Join(tl.dir, TreeDir, layout.CheckpointPath)
	if err := os.WriteFile(pubPath, notes[len(notes)-2], 0o644); err != nil {
		t.Fatal(err)
	}
	archive, err := os.OpenFile(filepath.Join(tl.dir, CheckpointsFile), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	archive.Write([]byte{0, 0, 1}) // a record cut short
	archive.Close()
	rep, err := Verify(context.Background(), tl.dir, tl.verifiers(t))
	if err != nil || rep.Unpublished != 1 || rep.Size != 6 || rep.Checkpoints != len(notes) {
		t.Fatalf("Verify of a log whose newest checkpoint is unpublished: %+v, %v", rep, err)
	}
	forged := bytes.Clone(notes[len(notes)-2])
	forged[len(forged)-3] ^= 1 // in the last signature
	if err := os.WriteFile(pubPath, forged, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(context.Background(), tl.dir, tl.verifiers(t)); err == nil || !strings.Contains(err.Error(), "not in the archive") {
		t.Fatalf("Verify with a published checkpoint outside the archive: %v", err)
	}
}
