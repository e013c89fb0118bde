package signing

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// fuzzNotes returns the signers of the fuzz seeds (an Ed25519 key from a
// fixed seed, so that saved inputs keep their meaning, and an ECDSA P-256
// key) and realistic signed checkpoints and broken variants.
func fuzzNotes(f *testing.F) (ed *NoteSigner, ec *NoteSigner, seeds [][]byte) {
	f.Helper()
	var err error
	if ed, err = NewNoteSigner("example.com/hsmd/audit", ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32))); err != nil {
		f.Fatal(err)
	}
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	if ec, err = NewNoteSigner("example.com/hsmd/audit", ek); err != nil {
		f.Fatal(err)
	}
	for _, size := range []uint64{0, 1, 42, 1 << 40} {
		for _, signers := range [][]note.Signer{{ed}, {ed, ec}, {ec}} {
			n, err := note.Sign(&note.Note{Text: checkpoint(size)}, signers...)
			if err != nil {
				f.Fatal(err)
			}
			seeds = append(seeds, n)
		}
	}
	good := seeds[1]
	body, sigs, _ := bytes.Cut(good, []byte("\n\n"))
	line, _, _ := bytes.Cut(sigs, []byte("\n"))
	seeds = append(seeds,
		body,                               // no signature block
		append(bytes.Clone(good), good...), // two notes
		bytes.Replace(good, []byte("\u2014 "), []byte("- "), 1), // ASCII dash
		bytes.Replace(good, []byte(" "), []byte("  "), 1),       // double space
		append(append(bytes.Clone(body), "\n\n"...), append(bytes.TrimSuffix(line, []byte("=")), "x\n"...)...),
		[]byte("\n\n"), []byte(""), []byte("origin\n1\nAAAA\n\n\u2014 origin AAAA\n"),
	)
	// Non-canonical base64: flip the unused bits of the last character
	// before the padding of the Ed25519 signature (64 bytes: two of them).
	b64 := string(line[strings.LastIndex(string(line), " ")+1:])
	if i := strings.IndexByte(b64, '='); i > 0 {
		nc := []byte(b64)
		nc[i-1] ^= 1
		seeds = append(seeds, bytes.Replace(good, []byte(b64), nc, 1))
	}
	return ed, ec, seeds
}

// FuzzCheckCanonical: CheckCanonical never panics, refuses with
// ErrNotCanonical, and accepts only signature lines whose base64 is
// exactly what encoding the signature gives.
func FuzzCheckCanonical(f *testing.F) {
	_, _, seeds := fuzzNotes(f)
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, n []byte) {
		err := CheckCanonical(n)
		if err != nil {
			if !errors.Is(err, ErrNotCanonical) {
				t.Fatalf("error %v does not match ErrNotCanonical", err)
			}
			return
		}
		_, sigs, _ := bytes.Cut(n, []byte("\n\n"))
		for _, line := range strings.Split(strings.TrimSuffix(string(sigs), "\n"), "\n") {
			f := strings.Fields(line)
			sig, err := base64.StdEncoding.DecodeString(f[2])
			if err != nil || base64.StdEncoding.EncodeToString(sig) != f[2] {
				t.Fatalf("accepted a non-canonical signature line %q", line)
			}
		}
	})
}

// FuzzVerify: Verify never panics; what it accepts opens with note.Open,
// and the accepted Ed25519 signature is the line signing the note's text
// again gives (Ed25519 is deterministic): parse, serialise, compare.
func FuzzVerify(f *testing.F) {
	ed, ec, seeds := fuzzNotes(f)
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s)
	}
	ev, err := note.NewVerifier(ed.VerifierKey())
	if err != nil {
		f.Fatal(err)
	}
	cv, err := tnote.NewECDSAVerifier(ec.VerifierKey())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		for _, vs := range [][]note.Verifier{{ev}, {ev, cv}} {
			err := Verify(msg, vs...)
			if err != nil {
				var inv *note.InvalidSignatureError
				if !errors.Is(err, ErrMissingSignature) && !errors.As(err, &inv) && !strings.HasPrefix(err.Error(), "signing: verify: ") {
					t.Fatalf("unprefixed error %v", err)
				}
				continue
			}
			n, err := note.Open(msg, note.VerifierList(vs...))
			if err != nil {
				t.Fatalf("Verify accepted what note.Open refuses: %v", err)
			}
			again, err := note.Sign(&note.Note{Text: n.Text}, ed)
			if err != nil {
				t.Fatal(err)
			}
			_, line, _ := bytes.Cut(again, []byte("\n\n"))
			if CheckCanonical(msg) == nil && !bytes.Contains(msg, line) {
				t.Fatalf("the accepted note lacks the signature line signing its text gives: %q", line)
			}
		}
	})
}
