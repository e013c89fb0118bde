package hsm_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/hsmd/hsmd/hsm"
)

func TestSigners(t *testing.T) {
	ctx := context.Background()
	h, _ := newKeyedHSM(t)
	msg := []byte("checkpoint body")
	digest := sha256.Sum256(msg)

	es, err := h.Signer(ctx, hsm.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	pub, ok := es.Public().(*ecdsa.PublicKey)
	if !ok {
		t.Fatalf("ECDSA Public() is %T", es.Public())
	}
	sig, err := es.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatal("ECDSA signature does not verify")
	}
	if _, err := es.Sign(rand.Reader, msg, crypto.Hash(0)); err == nil {
		t.Error("ECDSA signed without a SHA-256 digest")
	}

	edS, err := h.Signer(ctx, hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	edPub, ok := edS.Public().(ed25519.PublicKey)
	if !ok {
		t.Fatalf("Ed25519 Public() is %T", edS.Public())
	}
	sig, err = edS.Sign(rand.Reader, msg, crypto.Hash(0))
	if err != nil {
		t.Fatal(err)
	}
	if !ed25519.Verify(edPub, msg, sig) {
		t.Fatal("Ed25519 signature does not verify")
	}
	if _, err := edS.Sign(rand.Reader, digest[:], crypto.SHA256); err == nil {
		t.Error("Ed25519 accepted a pre-hashed message")
	}
	if _, err := edS.Sign(rand.Reader, msg, &ed25519.Options{Context: "x"}); err == nil {
		t.Error("Ed25519 accepted a context")
	}
	if _, err := h.Signer(ctx, hsm.SignAlg(99)); err == nil {
		t.Error("Signer accepted an unknown algorithm")
	}
}
