package signing

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
	"golang.org/x/mod/sumdb/note"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// hsmSigners opens a fresh SoftHSM token, makes and loads its keys, and
// returns note signers over its Ed25519 and ECDSA P-256 keys.
func hsmSigners(t testing.TB) (ed, ec *NoteSigner) {
	t.Helper()
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
	ecS, err := h.Signer(ctx, hsm.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if ed, err = NewNoteSigner("hsmd-hsm-ed25519", edS); err != nil {
		t.Fatal(err)
	}
	if ec, err = NewNoteSigner("hsmd-hsm-p256", ecS); err != nil {
		t.Fatal(err)
	}
	return ed, ec
}

func TestHSMSigners(t *testing.T) {
	ed, ec := hsmSigners(t)
	if ed.Type() != TypeEd25519 || ec.Type() != TypeECDSAP256 {
		t.Fatalf("types %x %x", ed.Type(), ec.Type())
	}
	edV := independentVerifier(t, ed, ed.VerifierKey(), TypeEd25519)
	ecV := independentVerifier(t, ec, ec.VerifierKey(), TypeECDSAP256)
	t.Run("Ed25519", func(t *testing.T) { checkSigner(t, ed, edV) })
	t.Run("ECDSAP256", func(t *testing.T) { checkSigner(t, ec, ecV) })

	t.Run("HybridWithMLDSA", func(t *testing.T) {
		ml := newMLDSA(t)
		mlV := independentVerifier(t, ml, ml.VerifierKey(), TypeMLDSA44Cosi)
		ctx := context.Background()
		signed, err := note.Sign(&note.Note{Text: checkpoint(99)}, ed.WithContext(ctx), ec.WithContext(ctx), ml)
		if err != nil {
			t.Fatal(err)
		}
		if err := Verify(signed, edV, ecV, mlV); err != nil {
			t.Fatalf("Verify: %v\n%s", err, signed)
		}
		edOnly, err := note.Sign(&note.Note{Text: checkpoint(99)}, ed)
		if err != nil {
			t.Fatal(err)
		}
		if err := Verify(edOnly, edV, mlV); !errors.Is(err, ErrMissingSignature) {
			t.Fatalf("Verify without ML-DSA = %v, want ErrMissingSignature", err)
		}
	})

	t.Run("CanceledContext", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		for _, s := range []*NoteSigner{ed, ec} {
			if _, err := s.SignContext(ctx, []byte(checkpoint(1))); !errors.Is(err, context.Canceled) {
				t.Errorf("%s: SignContext(canceled) = %v, want context.Canceled", s.Name(), err)
			}
		}
	})
}

func BenchmarkSignHSM(b *testing.B) {
	ed, ec := hsmSigners(b)
	msg := []byte(checkpoint(1 << 20))
	for _, s := range []*NoteSigner{ed, ec} {
		b.Run(s.Name(), func(b *testing.B) {
			for b.Loop() {
				if _, err := s.Sign(msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
