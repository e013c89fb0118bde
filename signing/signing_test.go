package signing

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// checkpoint returns a checkpoint-shaped note text.
func checkpoint(size uint64) string {
	root := sha256.Sum256(fmt.Appendf(nil, "root %d", size))
	return fmt.Sprintf("example.com/hsmd/audit\n%d\n%s\n", size, base64.StdEncoding.EncodeToString(root[:]))
}

// independentVerifier parses vkey with the verifier of record for its type:
// golang.org/x/mod/sumdb/note for Ed25519, transparency-dev/formats for the
// others. It checks the verifier agrees with the signer on name and hash.
func independentVerifier(t testing.TB, s note.Signer, vkey string, typ byte) note.Verifier {
	t.Helper()
	var v note.Verifier
	var err error
	switch typ {
	case TypeEd25519:
		v, err = note.NewVerifier(vkey)
	case TypeECDSAP256:
		v, err = tnote.NewECDSAVerifier(vkey)
	case TypeMLDSA44Cosi:
		v, err = tnote.NewMLDSAVerifier(vkey)
	}
	if err != nil {
		t.Fatalf("independent verifier rejects %q: %v", vkey, err)
	}
	// The generic formats constructor must dispatch to the same verifier.
	gv, err := tnote.NewVerifier(vkey)
	if err != nil {
		t.Fatalf("formats NewVerifier(%q): %v", vkey, err)
	}
	if v.Name() != s.Name() || v.KeyHash() != s.KeyHash() || gv.KeyHash() != s.KeyHash() {
		t.Fatalf("name/hash: signer %s+%08x, verifier %s+%08x, formats %08x",
			s.Name(), s.KeyHash(), v.Name(), v.KeyHash(), gv.KeyHash())
	}
	if want := fmt.Sprintf("%s+%08x+", s.Name(), s.KeyHash()); !strings.HasPrefix(vkey, want) {
		t.Fatalf("vkey %q does not start with %q", vkey, want)
	}
	return v
}

// checkSigner signs a checkpoint with s and checks the result against v
// with x/mod note.Open and Verify, including tampering.
func checkSigner(t *testing.T, s note.Signer, v note.Verifier) {
	t.Helper()
	text := checkpoint(42)
	signed, err := note.Sign(&note.Note{Text: text}, s)
	if err != nil {
		t.Fatalf("note.Sign: %v", err)
	}
	n, err := note.Open(signed, note.VerifierList(v))
	if err != nil {
		t.Fatalf("note.Open: %v\n%s", err, signed)
	}
	if n.Text != text || len(n.Sigs) != 1 {
		t.Fatalf("opened %q with %d sigs", n.Text, len(n.Sigs))
	}
	if err := Verify(signed, v); err != nil {
		t.Fatalf("Verify: %v", err)
	}

	// A flipped byte in the text (the size digit) must fail.
	bad := bytes.Replace(signed, []byte("\n42\n"), []byte("\n43\n"), 1)
	if err := Verify(bad, v); err == nil {
		t.Fatal("Verify accepted a note with altered text")
	}
	// A flipped byte in the signature must fail as an invalid signature.
	if err := Verify(flipSig(t, signed), v); !isInvalidSig(err) {
		t.Fatalf("Verify with flipped signature byte = %v, want *note.InvalidSignatureError", err)
	}
}

// flipSig flips one bit of the last raw signature byte in a one-signature note.
func flipSig(t testing.TB, signed []byte) []byte {
	t.Helper()
	i := bytes.LastIndex(signed, []byte(" "))
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(signed[i+1:])))
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)-1] ^= 1
	out := append([]byte{}, signed[:i+1]...)
	return append(append(out, base64.StdEncoding.EncodeToString(raw)...), '\n')
}

func isInvalidSig(err error) bool {
	var e *note.InvalidSignatureError
	return errors.As(err, &e)
}

func softwareSigners(t testing.TB) (ed, ec *NoteSigner) {
	t.Helper()
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if ed, err = NewNoteSigner("hsmd-ed25519", edKey); err != nil {
		t.Fatal(err)
	}
	if ec, err = NewNoteSigner("hsmd-p256", ecKey); err != nil {
		t.Fatal(err)
	}
	return ed, ec
}

func newMLDSA(t testing.TB) *MLDSASigner {
	t.Helper()
	priv, err := GenerateMLDSA(nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewMLDSASigner("hsmd-mldsa44", priv)
	clear(priv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Destroy)
	return s
}

func TestSoftwareSigners(t *testing.T) {
	ed, ec := softwareSigners(t)
	ml := newMLDSA(t)
	for _, tc := range []struct {
		name string
		s    note.Signer
		vkey string
		typ  byte
	}{
		{"Ed25519", ed, ed.VerifierKey(), TypeEd25519},
		{"ECDSAP256", ec, ec.VerifierKey(), TypeECDSAP256},
		{"MLDSA44", ml, ml.VerifierKey(), TypeMLDSA44Cosi},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkSigner(t, tc.s, independentVerifier(t, tc.s, tc.vkey, tc.typ))
		})
	}
}

// TestDemandAll signs with classical and post-quantum keys and checks that
// Verify demands every given verifier.
func TestDemandAll(t *testing.T) {
	ed, ec := softwareSigners(t)
	ml := newMLDSA(t)
	edV := independentVerifier(t, ed, ed.VerifierKey(), TypeEd25519)
	ecV := independentVerifier(t, ec, ec.VerifierKey(), TypeECDSAP256)
	mlV := independentVerifier(t, ml, ml.VerifierKey(), TypeMLDSA44Cosi)

	text := checkpoint(7)
	all, err := note.Sign(&note.Note{Text: text}, ed, ec, ml)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(all, edV, ecV, mlV); err != nil {
		t.Fatalf("Verify(all three): %v", err)
	}
	classical, err := note.Sign(&note.Note{Text: text}, ed, ec)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(classical, edV, ecV); err != nil {
		t.Fatalf("Verify(classical): %v", err)
	}
	if err := Verify(classical, edV, mlV); !errors.Is(err, ErrMissingSignature) {
		t.Fatalf("Verify without the ML-DSA signature = %v, want ErrMissingSignature", err)
	}
	if err := Verify(classical, mlV); !errors.Is(err, ErrMissingSignature) {
		t.Fatalf("Verify with no demanded signature = %v, want ErrMissingSignature", err)
	}
	if err := Verify(all); err == nil {
		t.Fatal("Verify with no verifiers succeeded")
	}
	if err := Verify(flipSig(t, all), edV, ecV, mlV); !isInvalidSig(err) {
		t.Fatalf("Verify with a flipped last signature = %v, want *note.InvalidSignatureError", err)
	}
}

func TestVerifierKeyRoundTrip(t *testing.T) {
	ed, ec := softwareSigners(t)
	ml := newMLDSA(t)
	for _, tc := range []struct {
		s    interface{ VerifierKey() string }
		typ  byte
		size int
	}{
		{ed, TypeEd25519, 1 + ed25519.PublicKeySize},
		{ec, TypeECDSAP256, 0},
		{ml, TypeMLDSA44Cosi, 1 + 1312},
	} {
		vkey := tc.s.VerifierKey()
		parts := strings.SplitN(vkey, "+", 3)
		if len(parts) != 3 {
			t.Fatalf("vkey %q: %d parts", vkey, len(parts))
		}
		raw, err := base64.StdEncoding.DecodeString(parts[2])
		if err != nil || raw[0] != tc.typ || (tc.size != 0 && len(raw) != tc.size) {
			t.Fatalf("vkey %q: type %x, %d bytes, %v", vkey, raw[0], len(raw), err)
		}
		v, err := tnote.NewVerifier(vkey)
		if err != nil {
			t.Fatal(err)
		}
		if got := fmt.Sprintf("%s+%08x+%s", v.Name(), v.KeyHash(), parts[2]); got != vkey {
			t.Fatalf("round trip %q != %q", got, vkey)
		}
	}
	// x/mod's own Ed25519 encoding agrees byte for byte.
	vk, err := note.NewEd25519VerifierKey(ed.Name(), ed.edPub)
	if err != nil || vk != ed.VerifierKey() {
		t.Fatalf("NewEd25519VerifierKey = %q, %v; want %q", vk, err, ed.VerifierKey())
	}
}

func TestUnsupportedKeys(t *testing.T) {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []crypto.Signer{p384, rsaKey, nil} {
		if _, err := NewNoteSigner("n", s); !errors.Is(err, ErrUnsupportedKey) {
			t.Errorf("%T: err = %v, want ErrUnsupportedKey", s, err)
		}
	}
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	for _, name := range []string{"", "a b", "a+b", "\xff"} {
		if _, err := NewNoteSigner(name, edKey); !errors.Is(err, ErrInvalidName) {
			t.Errorf("name %q: err = %v, want ErrInvalidName", name, err)
		}
		if _, err := NewMLDSASigner(name, make([]byte, MLDSAPrivateKeySize)); !errors.Is(err, ErrInvalidName) {
			t.Errorf("ML-DSA name %q: err = %v, want ErrInvalidName", name, err)
		}
	}
}

// faultySigner returns a signature over different data, as a faulty or
// substituted key would.
type faultySigner struct{ ed25519.PrivateKey }

func (f faultySigner) Sign(r io.Reader, msg []byte, o crypto.SignerOpts) ([]byte, error) {
	return f.PrivateKey.Sign(r, append([]byte("x"), msg...), o)
}

func TestFaultySignerRejected(t *testing.T) {
	_, k, _ := ed25519.GenerateKey(rand.Reader)
	s, err := NewNoteSigner("faulty", faultySigner{k})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := note.Sign(&note.Note{Text: checkpoint(1)}, s); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("err = %v, want ErrBadSignature", err)
	}
}

func TestMLDSAKeyHandling(t *testing.T) {
	priv, err := GenerateMLDSA(bytes.NewReader(bytes.Repeat([]byte{7}, 32)))
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewMLDSASigner("pq", priv)
	if err != nil {
		t.Fatal(err)
	}
	// Deterministic from the seed, and priv is not retained.
	s2, _ := NewMLDSASigner("pq", priv)
	clear(priv)
	if s.VerifierKey() != s2.VerifierKey() {
		t.Fatal("same seed, different keys")
	}
	if _, err := s.Sign([]byte(checkpoint(3))); err != nil {
		t.Fatalf("Sign after clearing priv: %v", err)
	}
	seedB64 := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
	for _, str := range []string{s.String(), fmt.Sprint(s), fmt.Sprintf("%+v", s), fmt.Sprintf("%#v", s)} {
		if !strings.Contains(str, "REDACTED") || strings.Contains(str, seedB64) || strings.Contains(str, "7, 7") {
			t.Fatalf("String leaks or lacks REDACTED: %s", str)
		}
	}
	if _, err := NewMLDSASigner("pq", make([]byte, 31)); !errors.Is(err, ErrInvalidKey) {
		t.Fatalf("short key: %v", err)
	}
	if _, err := GenerateMLDSA(bytes.NewReader(nil)); err == nil {
		t.Fatal("GenerateMLDSA with an empty reader succeeded")
	}
	// The timestamp rides in the signature, as formats reads it.
	s.now = func() time.Time { return time.Unix(1_700_000_000, 0) }
	signed, err := note.Sign(&note.Note{Text: checkpoint(3)}, s)
	if err != nil {
		t.Fatal(err)
	}
	n, err := note.Open(signed, note.VerifierList(independentVerifier(t, s, s.VerifierKey(), TypeMLDSA44Cosi)))
	if err != nil {
		t.Fatal(err)
	}
	if ts, err := tnote.CoSigV1Timestamp(n.Sigs[0]); err != nil || ts.Unix() != 1_700_000_000 {
		t.Fatalf("timestamp %v, %v", ts, err)
	}
	// Only bare checkpoints can be cosigned.
	for _, text := range []string{"not a checkpoint\n", checkpoint(3) + "extension\n", "o\n1\nAAAA\n"} {
		if _, err := s.Sign([]byte(text)); !errors.Is(err, ErrNotCheckpoint) {
			t.Errorf("Sign(%q) = %v, want ErrNotCheckpoint", text, err)
		}
	}
	s.Destroy()
	s.Destroy()
	if _, err := s.Sign([]byte(checkpoint(3))); !errors.Is(err, ErrDestroyed) {
		t.Fatalf("Sign after Destroy = %v, want ErrDestroyed", err)
	}
}

func BenchmarkSignSoftware(b *testing.B) {
	ed, ec := softwareSigners(b)
	ml := newMLDSA(b)
	msg := []byte(checkpoint(1 << 20))
	for _, s := range []note.Signer{ed, ec, ml} {
		b.Run(s.Name(), func(b *testing.B) {
			for b.Loop() {
				if _, err := s.Sign(msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
