package signing

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

const cosigName = "example.com/hsmd/witness"

// fixedClock returns a clock stuck at t.
func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

// cosigVerifier parses s's verifier key with transparency-dev/formats and
// checks it agrees with s on name and key hash.
func cosigVerifier(t testing.TB, s *CosignatureSigner) note.Verifier {
	t.Helper()
	v, err := tnote.NewVerifierForCosignatureV1(s.VerifierKey())
	if err != nil {
		t.Fatalf("formats rejects verifier key %q: %v", s.VerifierKey(), err)
	}
	if v.Name() != s.Name() || v.KeyHash() != s.KeyHash() {
		t.Fatalf("verifier %s+%08x, signer %s+%08x", v.Name(), v.KeyHash(), s.Name(), s.KeyHash())
	}
	return v
}

// checkCosig signs text with s at the fixed time want and checks the
// signature with formats' verifier, its timestamp and its layout.
func checkCosig(t *testing.T, s note.Signer, v note.Verifier, text string, want time.Time) {
	t.Helper()
	signed, err := note.Sign(&note.Note{Text: text}, s)
	if err != nil {
		t.Fatalf("note.Sign: %v", err)
	}
	n, err := note.Open(signed, note.VerifierList(v))
	if err != nil {
		t.Fatalf("formats cosignature/v1 verifier rejects the note: %v\n%s", err, signed)
	}
	if n.Text != text || len(n.Sigs) != 1 {
		t.Fatalf("opened %q with %d signatures", n.Text, len(n.Sigs))
	}
	ts, err := tnote.CoSigV1Timestamp(n.Sigs[0])
	if err != nil || !ts.Equal(want) {
		t.Fatalf("CoSigV1Timestamp = %v, %v; want %v", ts, err, want)
	}
	raw, err := base64.StdEncoding.DecodeString(n.Sigs[0].Base64)
	if err != nil || len(raw) != 4+8+ed25519.SignatureSize {
		t.Fatalf("signature of %d bytes (%v), want key hash, timestamp, Ed25519", len(raw), err)
	}
	if got := binary.BigEndian.Uint64(raw[4:]); got != uint64(want.Unix()) {
		t.Fatalf("timestamp bytes = %d, want %d", got, want.Unix())
	}
	if err := Verify(flipSig(t, signed), v); !isInvalidSig(err) {
		t.Fatalf("flipped signature: Verify = %v, want *note.InvalidSignatureError", err)
	}
	bad := bytes.Replace(signed, []byte(n.Text), []byte(strings.Replace(n.Text, "\n", "x\n", 1)), 1)
	if err := Verify(bad, v); err == nil {
		t.Fatal("Verify accepted a cosignature over altered text")
	}
}

func TestCosignatureV1Signer(t *testing.T) {
	seed := make([]byte, ed25519.SeedSize)
	rand.Read(seed)
	key := ed25519.NewKeyFromSeed(seed)
	when := time.Unix(1_760_000_000, 0)
	s, err := NewCosignatureV1Signer(cosigName, key, fixedClock(when))
	if err != nil {
		t.Fatal(err)
	}
	v := cosigVerifier(t, s)

	// formats' own cosignature/v1 signer for the same key has the same key
	// hash, and formats derives the same 0x04 vkey from the plain 0x01 one.
	skey := fmt.Sprintf("PRIVATE+KEY+%s+%08x+%s", cosigName, 0, base64.StdEncoding.EncodeToString(append([]byte{TypeEd25519}, seed...)))
	fs, err := tnote.NewSignerForCosignatureV1(skey)
	if err != nil {
		t.Fatal(err)
	}
	if fs.KeyHash() != s.KeyHash() {
		t.Fatalf("key hash %08x, formats %08x", s.KeyHash(), fs.KeyHash())
	}
	plain, err := note.NewEd25519VerifierKey(cosigName, key.Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	if want, err := tnote.VKeyToCosignatureV1(plain); err != nil || want != s.VerifierKey() {
		t.Fatalf("VerifierKey = %q, formats VKeyToCosignatureV1 = %q (%v)", s.VerifierKey(), want, err)
	}

	t.Run("Checkpoint", func(t *testing.T) { checkCosig(t, s, v, checkpoint(42), when) })
	t.Run("ExtensionLines", func(t *testing.T) {
		checkCosig(t, s, v, checkpoint(42)+"extension line\n", when)
	})
	t.Run("FormatsSignatureVerifies", func(t *testing.T) {
		// The verifier made from our vkey accepts formats' own signatures.
		signed, err := note.Sign(&note.Note{Text: checkpoint(7)}, fs)
		if err != nil {
			t.Fatal(err)
		}
		if err := Verify(signed, v); err != nil {
			t.Fatalf("formats signature: %v", err)
		}
	})
	t.Run("SignatureBytes", func(t *testing.T) {
		text := []byte(checkpoint(3))
		sig, err := s.Sign(text)
		if err != nil {
			t.Fatal(err)
		}
		msg := fmt.Appendf(nil, "cosignature/v1\ntime %d\n%s", when.Unix(), text)
		if len(sig) != 72 || binary.BigEndian.Uint64(sig) != uint64(when.Unix()) || !ed25519.Verify(key.Public().(ed25519.PublicKey), msg, sig[8:]) {
			t.Fatalf("signature %x is not timestamp || Ed25519(%q)", sig, msg)
		}
	})
}

func TestCosignatureV1SignerRefusals(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, tc := range map[string]struct {
		name string
		s    crypto.Signer
		want error
	}{
		"empty name": {"", key, ErrInvalidName},
		"name +":     {"a+b", key, ErrInvalidName},
		"name space": {"a b", key, ErrInvalidName},
		"ECDSA":      {cosigName, ecKey, ErrUnsupportedKey},
		"nil":        {cosigName, nil, ErrUnsupportedKey},
	} {
		if _, err := NewCosignatureV1Signer(tc.name, tc.s, nil); !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", name, err, tc.want)
		}
	}

	s, err := NewCosignatureV1Signer(cosigName, key, nil)
	if err != nil {
		t.Fatal(err)
	}
	root := base64.StdEncoding.EncodeToString(make([]byte, 31))
	for name, msg := range map[string]string{
		"empty":      "",
		"not a note": "hello\n",
		"no size":    "example.com/log\nx\n" + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n",
		"short hash": "example.com/log\n1\n" + root + "\n",
		"no origin":  "\n1\n" + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n",
	} {
		if _, err := s.Sign([]byte(msg)); !errors.Is(err, ErrNotCheckpoint) {
			t.Errorf("%s: Sign = %v, want ErrNotCheckpoint", name, err)
		}
	}

	t.Run("ClockAtEpoch", func(t *testing.T) {
		s, err := NewCosignatureV1Signer(cosigName, key, fixedClock(time.Unix(0, 0)))
		if err != nil {
			t.Fatal(err)
		}
		if sig, err := s.Sign([]byte(checkpoint(1))); err == nil {
			t.Fatalf("signed with a zero timestamp: %x", sig)
		}
	})
	t.Run("FaultySigner", func(t *testing.T) {
		s, err := NewCosignatureV1Signer("faulty", faultySigner{key}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := note.Sign(&note.Note{Text: checkpoint(1)}, s); !errors.Is(err, ErrBadSignature) {
			t.Fatalf("err = %v, want ErrBadSignature", err)
		}
	})
	t.Run("CanceledContext", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := note.Sign(&note.Note{Text: checkpoint(1)}, s.WithContext(ctx)); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
}

type ctxKey struct{}

// ctxCheckingSigner is an Ed25519 signer with SignContext that fails
// unless its context carries ctxKey.
type ctxCheckingSigner struct{ ed25519.PrivateKey }

func (c ctxCheckingSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("Sign called instead of SignContext")
}

func (c ctxCheckingSigner) SignContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if ctx.Value(ctxKey{}) == nil {
		return nil, errors.New("SignContext without the caller's context")
	}
	return c.PrivateKey.Sign(nil, msg, opts)
}

// TestCosignatureV1SignerContext checks that WithContext hands the caller's
// context to a crypto.Signer with SignContext, as the HSM signer has.
func TestCosignatureV1SignerContext(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	s, err := NewCosignatureV1Signer(cosigName, ctxCheckingSigner{key}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.WithValue(context.Background(), ctxKey{}, true)
	signed, err := note.Sign(&note.Note{Text: checkpoint(5)}, s.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(signed, cosigVerifier(t, s)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign([]byte(checkpoint(5))); err == nil {
		t.Fatal("Sign passed a context it was never given")
	}
}

// TestCosignatureV1SignerHSM cosigns with the SoftHSM token's Ed25519 key.
func TestCosignatureV1SignerHSM(t *testing.T) {
	ctx := context.Background()
	tok := softhsm.NewTestToken(t)
	h, err := hsm.Open(ctx, hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		t.Fatalf("hsm.Open: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("closing HSM: %v", err)
		}
		if n := h.OpenSessions(); n != 0 {
			t.Errorf("%d PKCS#11 sessions left open", n)
		}
	})
	if err := h.InitKeys(ctx); err != nil {
		t.Fatalf("InitKeys: %v", err)
	}
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatalf("LoadKeys: %v", err)
	}
	edS, err := h.Signer(ctx, hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	when := time.Unix(1_770_000_000, 0)
	s, err := NewCosignatureV1Signer(cosigName, edS, fixedClock(when))
	if err != nil {
		t.Fatal(err)
	}
	v := cosigVerifier(t, s)
	t.Run("Sign", func(t *testing.T) { checkCosig(t, s, v, checkpoint(99), when) })
	t.Run("WithContext", func(t *testing.T) { checkCosig(t, s.WithContext(ctx), v, checkpoint(100), when) })
	t.Run("Witness", func(t *testing.T) {
		l := newTestLog(t, "a", 9)
		w, _, _ := newTestWitness(t, l)
		w.Signer = s
		cp := l.checkpoint(9)
		sigs, err := w.AddCheckpoint(ctx, 0, nil, cp)
		if err != nil {
			t.Fatal(err)
		}
		checkCosigned(t, cp, sigs, l.vkey, v)
	})
}
