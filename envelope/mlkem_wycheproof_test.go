package envelope_test

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/hpke"
	"crypto/mlkem"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/internal/wycheproof"
)

// TestWycheproofMLKEM768 runs the Wycheproof ML-KEM-768 decapsulation
// vectors through the ML-KEM hsmd's suite 0x02 (X-Wing) rests on. hsmd
// does not use circl for X-Wing: envelope.XWingSuite is crypto/hpke's
// MLKEM768X25519, whose private key holds a crypto/mlkem
// DecapsulationKey768 (made by NewDecapsulationKey768 from 64 bytes
// expanded from the key's seed) and whose decapsulation calls its
// Decapsulate on the first 1088 bytes of the encapsulation.
//
// For each vector: NewDecapsulationKey768(seed) must give the encapsulation
// key ek (which NewEncapsulationKey768, the public key path of X-Wing,
// must accept), and Decapsulate(c) must give K, including the implicit
// rejection vectors. Invalid vectors (a seed or a ciphertext of the wrong
// length) must fail. Then, in the X-Wing path itself, for each valid
// vector: an X-Wing key made of that ML-KEM key and a random X25519 key
// must decapsulate c || X25519 share to the same HPKE context as one
// whose ML-KEM part returns the vector's K (compared by Export), and must
// open what envelope.SealXWing seals to its public key with
// envelope.OpenXWing; for an invalid ciphertext, hpke.NewRecipient must
// fail.
func TestWycheproofMLKEM768(t *testing.T) {
	f := wycheproof.Load[wycheproof.MLKEMGroup](t, "mlkem_768_test.json")
	var st, xw wycheproof.Stats
	for _, g := range f.Groups {
		if g.ParameterSet != "ML-KEM-768" {
			t.Fatalf("group of %s in mlkem_768_test.json", g.ParameterSet)
		}
		for _, v := range g.Tests {
			dk, err := mlkemCase(v)
			st.Check(t, v.Case, err == nil, err)
			if dk == nil {
				xw.Skip("seed of the wrong size: no ML-KEM key to put in an X-Wing key")
				continue
			}
			err = xwingCase(v, dk)
			xw.Check(t, v.Case, err == nil, err)
		}
	}
	st.Report(t, "ML-KEM-768 (crypto/mlkem)", wycheproof.Valid, wycheproof.Invalid)
	xw.Report(t, "ML-KEM-768 inside X-Wing (crypto/hpke, envelope.SealXWing/OpenXWing)", wycheproof.Valid, wycheproof.Invalid)
}

// mlkemCase checks v against crypto/mlkem. It returns the decapsulation
// key if the seed made one, and an error if v was rejected.
func mlkemCase(v wycheproof.MLKEMTest) (*mlkem.DecapsulationKey768, error) {
	dk, err := mlkem.NewDecapsulationKey768(v.Seed)
	if err != nil {
		return nil, fmt.Errorf("NewDecapsulationKey768: %w", err)
	}
	if ek := dk.EncapsulationKey().Bytes(); !bytes.Equal(ek, v.EK) {
		return dk, fmt.Errorf("encapsulation key %x..., want %x...", ek[:16], v.EK[:min(16, len(v.EK))])
	}
	if _, err := mlkem.NewEncapsulationKey768(v.EK); err != nil {
		return dk, fmt.Errorf("NewEncapsulationKey768: %w", err)
	}
	k, err := dk.Decapsulate(v.C)
	if err != nil {
		return dk, fmt.Errorf("Decapsulate: %w", err)
	}
	if !bytes.Equal(k, v.K) {
		return dk, fmt.Errorf("shared key %x, want %x", k, v.K)
	}
	return dk, nil
}

// xwingCase runs v's ciphertext through an X-Wing private key built on dk
// (see TestWycheproofMLKEM768). It returns an error if v was rejected.
func xwingCase(v wycheproof.MLKEMTest, dk *mlkem.DecapsulationKey768) error {
	x, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	priv, err := hpke.NewHybridPrivateKey(dk, x)
	if err != nil {
		return fmt.Errorf("NewHybridPrivateKey: %w", err)
	}
	kem, kdf, aead := envelope.XWingSuite()
	if priv.KEM().ID() != kem.ID() {
		return fmt.Errorf("hybrid KEM %#04x, the suite's is %#04x", priv.KEM().ID(), kem.ID())
	}
	eph, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	enc := append(bytes.Clone(v.C), eph.PublicKey().Bytes()...)
	info := []byte("hsmd wycheproof")
	real, err := hpke.NewRecipient(enc, priv, kdf, aead, info)
	if err != nil {
		return fmt.Errorf("NewRecipient: %w", err)
	}
	known, err := hpke.NewHybridPrivateKey(knownDecap{dk, v.C, v.K}, x)
	if err != nil {
		return err
	}
	want, err := hpke.NewRecipient(enc, known, kdf, aead, info)
	if err != nil {
		return err
	}
	a, errA := real.Export("wycheproof", 32)
	b, errB := want.Export("wycheproof", 32)
	if err := errors.Join(errA, errB); err != nil {
		return err
	}
	if !bytes.Equal(a, b) {
		return errors.New("X-Wing decapsulation differs from one with the vector's ML-KEM shared key")
	}
	msg := []byte("wycheproof tcId " + fmt.Sprint(v.TcID))
	ct, err := envelope.SealXWing(priv.PublicKey(), "wycheproof", 1, 1, msg, nil)
	if err != nil {
		return fmt.Errorf("SealXWing: %w", err)
	}
	if pt, err := envelope.OpenXWing(priv, "wycheproof", ct, nil); err != nil || !bytes.Equal(pt, msg) {
		return fmt.Errorf("OpenXWing: %q, %v", pt, err)
	}
	return nil
}

// knownDecap is a decapsulation key whose Decapsulate returns the
// vector's shared key k for its ciphertext c, and fails otherwise.
type knownDecap struct {
	dk   *mlkem.DecapsulationKey768
	c, k []byte
}

func (d knownDecap) Encapsulator() crypto.Encapsulator { return d.dk.EncapsulationKey() }

func (d knownDecap) Decapsulate(c []byte) ([]byte, error) {
	if !bytes.Equal(c, d.c) {
		return nil, errors.New("knownDecap: another ciphertext")
	}
	return bytes.Clone(d.k), nil
}
