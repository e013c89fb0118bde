package signing

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/transparency-dev/formats/log"
	tnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/merkle/testonly"
	"golang.org/x/mod/sumdb/note"
)

const testOrigin = "example.com/hsmd/testlog"

// testLog is an in-memory RFC 6962 tree with an Ed25519 note key.
type testLog struct {
	t      testing.TB
	tree   *testonly.Tree
	signer note.Signer
	vkey   note.Verifier
}

func newTestLog(t testing.TB, prefix string, n int) *testLog {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rand.Reader, testOrigin)
	if err != nil {
		t.Fatal(err)
	}
	s, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		t.Fatal(err)
	}
	l := &testLog{t: t, tree: testonly.New(rfc6962.DefaultHasher), signer: s, vkey: v}
	for i := range n {
		l.tree.AppendData(fmt.Appendf(nil, "%s entry %d", prefix, i))
	}
	return l
}

// checkpoint returns the log's signed checkpoint at size.
func (l *testLog) checkpoint(size uint64) []byte {
	l.t.Helper()
	body := log.Checkpoint{Origin: testOrigin, Size: size, Hash: l.tree.HashAt(size)}.Marshal()
	msg, err := note.Sign(&note.Note{Text: string(body)}, l.signer)
	if err != nil {
		l.t.Fatal(err)
	}
	return msg
}

func (l *testLog) proof(from, to uint64) [][]byte {
	l.t.Helper()
	p, err := l.tree.ConsistencyProof(from, to)
	if err != nil {
		l.t.Fatal(err)
	}
	return p
}

// newTestWitness returns a witness for l with a cosignature/v1 Ed25519
// cosigner, its verifier, and its state file path.
func newTestWitness(t testing.TB, l *testLog) (*Witness, note.Verifier, string) {
	t.Helper()
	skey, _, err := note.GenerateKey(rand.Reader, "example.com/hsmd/witness")
	if err != nil {
		t.Fatal(err)
	}
	cs, err := tnote.NewSignerForCosignatureV1(skey)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "witness.json")
	st, err := NewFileWitnessState(path)
	if err != nil {
		t.Fatal(err)
	}
	w := &Witness{Signer: cs, Logs: map[string]note.Verifier{testOrigin: l.vkey}, State: st}
	return w, cs.Verifier(), path
}

// checkCosigned checks that sigs are a valid cosignature on checkpoint.
func checkCosigned(t testing.TB, checkpoint, sigs []byte, logV, cosigV note.Verifier) {
	t.Helper()
	msg := append(bytes.Clone(checkpoint), sigs...)
	if err := Verify(msg, logV, cosigV); err != nil {
		t.Fatalf("cosigned checkpoint does not verify: %v\n%s", err, msg)
	}
	n, err := note.Open(msg, note.VerifierList(cosigV))
	if err != nil {
		t.Fatal(err)
	}
	if len(n.Sigs) != 1 || n.Sigs[0].Name != cosigV.Name() {
		t.Fatalf("cosigner signatures = %+v", n.Sigs)
	}
}

func wantState(t testing.TB, st WitnessState, size uint64, root []byte) {
	t.Helper()
	gotSize, gotRoot, ok, err := st.Get(context.Background(), testOrigin)
	if err != nil || !ok || gotSize != size || !bytes.Equal(gotRoot, root) {
		t.Fatalf("state = (%d, %x, %v, %v), want (%d, %x)", gotSize, gotRoot, ok, err, size, root)
	}
}

func wantConflict(t testing.TB, err error, size uint64) {
	t.Helper()
	var ce *ConflictError
	if !errors.Is(err, ErrConflict) || !errors.As(err, &ce) || ce.Size != size {
		t.Fatalf("err = %v, want ConflictError{Size: %d}", err, size)
	}
}

func TestWitnessGrowingLog(t *testing.T) {
	ctx := context.Background()
	l := newTestLog(t, "a", 12)
	w, cosigV, _ := newTestWitness(t, l)

	cp5 := l.checkpoint(5)
	sigs, err := w.AddCheckpoint(ctx, 0, nil, cp5)
	if err != nil {
		t.Fatalf("0 -> 5: %v", err)
	}
	checkCosigned(t, cp5, sigs, l.vkey, cosigV)
	wantState(t, w.State, 5, l.tree.HashAt(5))

	cp12 := l.checkpoint(12)
	sigs, err = w.AddCheckpoint(ctx, 5, l.proof(5, 12), cp12)
	if err != nil {
		t.Fatalf("5 -> 12: %v", err)
	}
	checkCosigned(t, cp12, sigs, l.vkey, cosigV)
	wantState(t, w.State, 12, l.tree.HashAt(12))

	// Resubmitting the latest checkpoint cosigns it again.
	sigs, err = w.AddCheckpoint(ctx, 12, nil, cp12)
	if err != nil {
		t.Fatalf("12 -> 12: %v", err)
	}
	checkCosigned(t, cp12, sigs, l.vkey, cosigV)
}

func TestWitnessRefusals(t *testing.T) {
	ctx := context.Background()
	l := newTestLog(t, "a", 12)
	w, _, _ := newTestWitness(t, l)
	if _, err := w.AddCheckpoint(ctx, 0, nil, l.checkpoint(5)); err != nil {
		t.Fatal(err)
	}

	t.Run("bad proof", func(t *testing.T) {
		p := l.proof(5, 12)
		p[0] = bytes.Clone(p[0])
		p[0][0] ^= 1
		_, err := w.AddCheckpoint(ctx, 5, p, l.checkpoint(12))
		if !errors.Is(err, ErrBadProof) {
			t.Fatalf("err = %v, want ErrBadProof", err)
		}
		_, err = w.AddCheckpoint(ctx, 5, nil, l.checkpoint(12))
		if !errors.Is(err, ErrBadProof) {
			t.Fatalf("empty proof: err = %v, want ErrBadProof", err)
		}
		wantState(t, w.State, 5, l.tree.HashAt(5))
	})

	t.Run("stale old size", func(t *testing.T) {
		_, err := w.AddCheckpoint(ctx, 0, nil, l.checkpoint(12))
		wantConflict(t, err, 5)
		_, err = w.AddCheckpoint(ctx, 7, l.proof(7, 12), l.checkpoint(12))
		wantConflict(t, err, 5)
	})

	t.Run("fork at the same size", func(t *testing.T) {
		fork := newTestLog(t, "b", 5)
		fork.signer, fork.vkey = l.signer, l.vkey // the log's key signs a fork
		_, err := w.AddCheckpoint(ctx, 5, nil, fork.checkpoint(5))
		if !errors.Is(err, ErrBadProof) {
			t.Fatalf("err = %v, want ErrBadProof", err)
		}
		wantState(t, w.State, 5, l.tree.HashAt(5))
	})

	if _, err := w.AddCheckpoint(ctx, 5, l.proof(5, 12), l.checkpoint(12)); err != nil {
		t.Fatal(err)
	}

	t.Run("rollback", func(t *testing.T) {
		_, err := w.AddCheckpoint(ctx, 12, nil, l.checkpoint(5))
		if !errors.Is(err, ErrMalformed) {
			t.Fatalf("err = %v, want ErrMalformed", err)
		}
		_, err = w.AddCheckpoint(ctx, 5, nil, l.checkpoint(5))
		wantConflict(t, err, 12)
		wantState(t, w.State, 12, l.tree.HashAt(12))
	})

	t.Run("unknown origin", func(t *testing.T) {
		other := &Witness{Signer: w.Signer, Logs: map[string]note.Verifier{"example.com/other": l.vkey}, State: w.State}
		_, err := other.AddCheckpoint(ctx, 12, nil, l.checkpoint(12))
		if !errors.Is(err, ErrUnknownOrigin) {
			t.Fatalf("err = %v, want ErrUnknownOrigin", err)
		}
	})

	t.Run("bad log signature", func(t *testing.T) {
		// Another key under the log's name.
		impostor := newTestLog(t, "a", 12)
		_, err := w.AddCheckpoint(ctx, 12, nil, impostor.checkpoint(12))
		if !errors.Is(err, ErrBadLogSignature) {
			t.Fatalf("other key: err = %v, want ErrBadLogSignature", err)
		}
		// The log's key, but a tampered body.
		cp := l.checkpoint(12)
		i := bytes.Index(cp, []byte("\n\n"))
		cp[i-1] ^= 1 // last base64 character of the root hash
		_, err = w.AddCheckpoint(ctx, 12, nil, cp)
		if !errors.Is(err, ErrBadLogSignature) {
			t.Fatalf("tampered: err = %v, want ErrBadLogSignature", err)
		}
	})

	t.Run("malformed", func(t *testing.T) {
		for name, cp := range map[string][]byte{
			"empty":     nil,
			"no origin": []byte("\n12\n"),
			"too big":   append([]byte(testOrigin+"\n"), make([]byte, MaxCheckpointSize)...),
			"not note":  []byte(testOrigin + "\n12\n"),
		} {
			if _, err := w.AddCheckpoint(ctx, 12, nil, cp); !errors.Is(err, ErrMalformed) {
				t.Errorf("%s: err = %v, want ErrMalformed", name, err)
			}
		}
		if _, err := w.AddCheckpoint(ctx, 12, make([][]byte, MaxProofHashes+1), l.checkpoint(12)); !errors.Is(err, ErrMalformed) {
			t.Errorf("long proof: err = %v, want ErrMalformed", err)
		}
	})
}

func TestWitnessStateSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	l := newTestLog(t, "a", 12)
	w, cosigV, path := newTestWitness(t, l)
	if _, err := w.AddCheckpoint(ctx, 0, nil, l.checkpoint(5)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.AddCheckpoint(ctx, 5, l.proof(5, 12), l.checkpoint(12)); err != nil {
		t.Fatal(err)
	}

	st, err := NewFileWitnessState(path)
	if err != nil {
		t.Fatal(err)
	}
	wantState(t, st, 12, l.tree.HashAt(12))
	w2 := &Witness{Signer: w.Signer, Logs: w.Logs, State: st}
	_, err = w2.AddCheckpoint(ctx, 0, nil, l.checkpoint(12))
	wantConflict(t, err, 12)
	_, err = w2.AddCheckpoint(ctx, 12, nil, l.checkpoint(5))
	if !errors.Is(err, ErrMalformed) {
		t.Fatalf("rollback after restart: err = %v, want ErrMalformed", err)
	}
	cp := l.checkpoint(12)
	sigs, err := w2.AddCheckpoint(ctx, 12, nil, cp)
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, cp, sigs, l.vkey, cosigV)

	// No temporary files are left behind.
	ents, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 {
		t.Fatalf("state directory holds %d files, want 1", len(ents))
	}
}

// TestWitnessRace submits the same first checkpoint concurrently: exactly
// one submission wins, the others see a conflict at its size.
func TestWitnessRace(t *testing.T) {
	ctx := context.Background()
	l := newTestLog(t, "a", 5)
	w, _, _ := newTestWitness(t, l)
	cp := l.checkpoint(5)
	const n = 16
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { _, errs[i] = w.AddCheckpoint(ctx, 0, nil, cp) })
	}
	wg.Wait()
	wins := 0
	for _, err := range errs {
		if err == nil {
			wins++
			continue
		}
		wantConflict(t, err, 5)
	}
	if wins != 1 {
		t.Fatalf("%d submissions won, want 1", wins)
	}
}

// TestWitnessOwnSigners cosigns with this package's NoteSigner and
// MLDSASigner.
func TestWitnessOwnSigners(t *testing.T) {
	ctx := context.Background()
	ed, _ := softwareSigners(t)
	ml := newMLDSA(t)
	for _, tc := range []struct {
		name string
		s    note.Signer
		vkey string
		typ  byte
	}{
		{"NoteSigner", ed, ed.VerifierKey(), TypeEd25519},
		{"MLDSASigner", ml, ml.VerifierKey(), TypeMLDSA44Cosi},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLog(t, "a", 3)
			w, _, _ := newTestWitness(t, l)
			w.Signer = tc.s
			cp := l.checkpoint(3)
			sigs, err := w.AddCheckpoint(ctx, 0, nil, cp)
			if err != nil {
				t.Fatal(err)
			}
			checkCosigned(t, cp, sigs, l.vkey, independentVerifier(t, tc.s, tc.vkey, tc.typ))
		})
	}
}

func TestFileWitnessState(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state.json")
	st, err := NewFileWitnessState(path)
	if err != nil {
		t.Fatal(err)
	}
	r1, r2 := []byte("root one"), []byte("root two")
	for _, tc := range []struct {
		oldSize uint64
		oldRoot []byte
		size    uint64
		root    []byte
		want    bool
	}{
		{3, r1, 4, r2, false}, // absent, not (3, r1)
		{0, nil, 3, r1, true},
		{0, nil, 4, r2, false}, // present now
		{3, r2, 4, r2, false},  // wrong root
		{3, r1, 4, r2, true},
	} {
		ok, err := st.CompareAndSet(ctx, testOrigin, tc.oldSize, tc.oldRoot, tc.size, tc.root)
		if err != nil || ok != tc.want {
			t.Fatalf("CompareAndSet(%d, %q -> %d, %q) = %v, %v; want %v", tc.oldSize, tc.oldRoot, tc.size, tc.root, ok, err, tc.want)
		}
	}
	wantState(t, st, 4, r2)

	for name, body := range map[string]string{
		"version": `{"version": 2, "logs": {}}`,
		"unknown": `{"version": 1, "logs": {}, "extra": 1}`,
		"empty":   `{"version": 1, "logs": {"o": {"size": 1}}}`,
		"json":    `{"version": 1`,
	} {
		p := filepath.Join(t.TempDir(), name+".json")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := NewFileWitnessState(p); err == nil {
			t.Errorf("%s: NewFileWitnessState accepted %s", name, body)
		}
	}
}
