package server

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/transparency-dev/formats/log"
	tnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/merkle/testonly"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/signing"
)

const fuzzOrigin = "example.com/hsmd/fuzzlog"

// fuzzWitnessLog is a log of 16 entries with an Ed25519 key from a fixed
// seed (so that saved inputs keep their meaning).
type fuzzWitnessLog struct {
	tree   *testonly.Tree
	signer note.Signer
	vkey   note.Verifier
}

func newFuzzWitnessLog(f *testing.F) *fuzzWitnessLog {
	f.Helper()
	pub := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{3}, 32)).Public().(ed25519.PublicKey)
	vk, err := note.NewEd25519VerifierKey(fuzzOrigin, pub)
	if err != nil {
		f.Fatal(err)
	}
	v, err := note.NewVerifier(vk)
	if err != nil {
		f.Fatal(err)
	}
	s, err := signing.NewNoteSigner(fuzzOrigin, ed25519.NewKeyFromSeed(bytes.Repeat([]byte{3}, 32)))
	if err != nil {
		f.Fatal(err)
	}
	l := &fuzzWitnessLog{tree: testonly.New(rfc6962.DefaultHasher), signer: s, vkey: v}
	for i := range 16 {
		l.tree.AppendData(fmt.Appendf(nil, "entry %d", i))
	}
	return l
}

// body is an add-checkpoint request from old to size (ext: extension lines).
func (l *fuzzWitnessLog) body(f *testing.F, old, size uint64, ext string) []byte {
	f.Helper()
	text := string(log.Checkpoint{Origin: fuzzOrigin, Size: size, Hash: l.tree.HashAt(size)}.Marshal()) + ext
	cp, err := note.Sign(&note.Note{Text: text}, l.signer)
	if err != nil {
		f.Fatal(err)
	}
	b := fmt.Appendf(nil, "old %d\n", old)
	if old > 0 && old < size {
		p, err := l.tree.ConsistencyProof(old, size)
		if err != nil {
			f.Fatal(err)
		}
		for _, h := range p {
			b = fmt.Appendf(b, "%s\n", base64.StdEncoding.EncodeToString(h))
		}
	}
	return append(append(b, '\n'), cp...)
}

func addCheckpointSeeds(f *testing.F, l *fuzzWitnessLog) [][]byte {
	f.Helper()
	seeds := [][]byte{
		l.body(f, 0, 5, ""), l.body(f, 0, 16, "extension line\n"), l.body(f, 3, 9, ""),
		l.body(f, 8, 8, ""), l.body(f, 9, 3, ""), l.body(f, 0, 0, ""),
	}
	good := seeds[2]
	return append(seeds,
		bytes.Replace(good, []byte("old 3"), []byte("old 03"), 1),
		bytes.Replace(good, []byte("old 3"), []byte("old 18446744073709551616"), 1),
		bytes.Replace(good, []byte("old 3\n"), []byte("old 3\nAAAA\n"), 1),
		bytes.Replace(good, []byte("\n\n"), []byte("\n"), 1),
		good[:len(good)-10],
		[]byte("old 0\n\n"), []byte("old 0\n"), []byte(""), []byte("old \n\n"),
	)
}

// FuzzParseAddCheckpoint: parseAddCheckpoint never panics, its errors
// match signing.ErrMalformed, it keeps the proof cap, and what it accepts
// serialises back to the very body (the format has one spelling).
func FuzzParseAddCheckpoint(f *testing.F) {
	seeds := addCheckpointSeeds(f, newFuzzWitnessLog(f))
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		old, proof, cp, err := parseAddCheckpoint(body)
		if err != nil {
			if !errors.Is(err, signing.ErrMalformed) {
				t.Fatalf("error %v does not match ErrMalformed", err)
			}
			return
		}
		if len(proof) > signing.MaxProofHashes {
			t.Fatalf("%d proof hashes accepted", len(proof))
		}
		out := []byte("old " + strconv.FormatUint(old, 10) + "\n")
		for _, h := range proof {
			if len(h) != 32 {
				t.Fatalf("a proof hash of %d bytes", len(h))
			}
			out = append(append(out, base64.StdEncoding.EncodeToString(h)...), '\n')
		}
		out = append(append(out, '\n'), cp...)
		if !bytes.Equal(out, body) {
			t.Fatalf("parsed as (%d, %d hashes, %d bytes) which serialise to\n%q\nnot\n%q", old, len(proof), len(cp), out, body)
		}
	})
}

// memState is an in-memory signing.WitnessState.
type memState struct {
	mu   sync.Mutex
	size map[string]uint64
	root map[string][]byte
}

func (m *memState) Get(_ context.Context, origin string) (uint64, []byte, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.root[origin]
	return m.size[origin], r, ok, nil
}

func (m *memState) CompareAndSet(_ context.Context, origin string, oldSize uint64, oldRoot []byte, size uint64, root []byte) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.root[origin]
	if m.size[origin] != oldSize || !bytes.Equal(r, oldRoot) || (!ok && oldRoot != nil) {
		return false, nil
	}
	m.size[origin], m.root[origin] = size, bytes.Clone(root)
	return true, nil
}

// FuzzWitnessHandler: any body POSTed to the add-checkpoint handler of a
// witness at size 3 gets one of the documented statuses (never a 5xx: the
// signer is in software), and a 200 carries a cosignature that verifies
// over the submitted checkpoint.
func FuzzWitnessHandler(f *testing.F) {
	l := newFuzzWitnessLog(f)
	seeds := addCheckpointSeeds(f, l)
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Add(bytes.Repeat([]byte("x"), MaxAddCheckpointBody+1))
	cs, err := signing.NewCosignatureV1Signer("example.com/hsmd/witness", ed25519.NewKeyFromSeed(bytes.Repeat([]byte{5}, 32)),
		func() time.Time { return time.Unix(1_760_000_000, 0) })
	if err != nil {
		f.Fatal(err)
	}
	cv, err := tnote.NewVerifierForCosignatureV1(cs.VerifierKey())
	if err != nil {
		f.Fatal(err)
	}
	allowed := map[int]bool{200: true, 400: true, 403: true, 404: true, 409: true, 413: true, 422: true}
	f.Fuzz(func(t *testing.T, body []byte) {
		st := &memState{size: map[string]uint64{fuzzOrigin: 3}, root: map[string][]byte{fuzzOrigin: l.tree.HashAt(3)}}
		h, err := NewWitnessHandler(&signing.Witness{Signer: cs, Logs: map[string]note.Verifier{fuzzOrigin: l.vkey}, State: st}, nil)
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, AddCheckpointPath, bytes.NewReader(body)))
		if !allowed[rec.Code] {
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
		if rec.Code != 200 {
			return
		}
		_, _, cp, err := parseAddCheckpoint(body)
		if err != nil {
			t.Fatalf("200 for a body that does not parse: %v", err)
		}
		if _, err := note.Open(append(bytes.Clone(cp), rec.Body.Bytes()...), note.VerifierList(l.vkey, cv)); err != nil {
			t.Fatalf("the cosignature does not verify: %v", err)
		}
	})
}
