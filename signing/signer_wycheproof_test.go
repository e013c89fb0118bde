package signing_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"io"
	"testing"

	"github.com/hsmd/hsmd/internal/wycheproof"
	"github.com/hsmd/hsmd/signing"
)

// replaySigner is a crypto.Signer that returns a fixed signature (a
// vector's) and records what it was asked to sign.
type replaySigner struct {
	pub    crypto.PublicKey
	sig    []byte
	digest []byte
	opts   crypto.SignerOpts
}

func (s *replaySigner) Public() crypto.PublicKey { return s.pub }

func (s *replaySigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	s.digest, s.opts = bytes.Clone(digest), opts
	return bytes.Clone(s.sig), nil
}

// noteSignerCase signs msg with a NoteSigner over s, which returns the
// vector's signature: NoteSigner checks every signature against the
// public key before it returns it (ecdsa.VerifyASN1 over SHA-256(msg), or
// ed25519.Verify), so the vector is accepted iff Sign succeeds. Any other
// error than ErrBadSignature, or a wrong request to s, is reported on t.
func noteSignerCase(t *testing.T, c wycheproof.Case, s *replaySigner, msg []byte, wantDigest []byte, wantHash crypto.Hash) (bool, error) {
	ns, err := signing.NewNoteSigner("wycheproof", s)
	if err != nil {
		t.Fatalf("%v: NewNoteSigner: %v", c, err)
	}
	sig, err := ns.Sign(msg)
	if !bytes.Equal(s.digest, wantDigest) || s.opts == nil || s.opts.HashFunc() != wantHash {
		t.Errorf("%v: the signer was asked to sign %x with %v, want %x with %v", c, s.digest, s.opts, wantDigest, wantHash)
	}
	switch {
	case err == nil && !bytes.Equal(sig, s.sig):
		t.Errorf("%v: Sign returned %x, not the signer's signature", c, sig)
	case err != nil && !errors.Is(err, signing.ErrBadSignature):
		t.Errorf("%v: Sign: %v, want ErrBadSignature", c, err)
	}
	return err == nil, err
}

// TestWycheproofNoteSignerECDSA runs the Wycheproof ECDSA P-256 SHA-256
// vectors (DER signatures: NoteSigner requires ASN.1 DER from its
// crypto.Signer, as hsm's signer returns after converting the PKCS#11
// r || s, and a type 0x02 note signature is DER) through the check
// NoteSigner makes of each ECDSA signature before it returns it.
func TestWycheproofNoteSignerECDSA(t *testing.T) {
	f := wycheproof.Load[wycheproof.ECDSAGroup](t, "ecdsa_secp256r1_sha256_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		pub := ecdsaGroupKey(t, g)
		for _, v := range g.Tests {
			digest := sha256.Sum256(v.Msg)
			ok, err := noteSignerCase(t, v.Case, &replaySigner{pub: pub, sig: v.Sig}, v.Msg, digest[:], crypto.SHA256)
			st.Check(t, v.Case, ok, err)
		}
	}
	st.Report(t, "ECDSA P-256 DER (NoteSigner check)", wycheproof.Valid, wycheproof.Invalid)
}

// TestWycheproofNoteSignerEd25519 runs the Wycheproof Ed25519 vectors
// through the check NoteSigner makes of each Ed25519 signature (length,
// then ed25519.Verify) before it returns it.
func TestWycheproofNoteSignerEd25519(t *testing.T) {
	f := wycheproof.Load[wycheproof.EdDSAGroup](t, "ed25519_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		if len(g.PublicKey.PK) != ed25519.PublicKeySize {
			t.Fatalf("Ed25519 group key of %d bytes", len(g.PublicKey.PK))
		}
		pub := ed25519.PublicKey(g.PublicKey.PK)
		for _, v := range g.Tests {
			ok, err := noteSignerCase(t, v.Case, &replaySigner{pub: pub, sig: v.Sig}, v.Msg, v.Msg, 0)
			st.Check(t, v.Case, ok, err)
		}
	}
	st.Report(t, "Ed25519 (NoteSigner check)", wycheproof.Valid, wycheproof.Invalid)
}

// ecdsaGroupKey parses a group's P-256 SubjectPublicKeyInfo.
func ecdsaGroupKey(t *testing.T, g wycheproof.ECDSAGroup) *ecdsa.PublicKey {
	t.Helper()
	if g.PublicKey.Curve != "secp256r1" || g.SHA != "SHA-256" {
		t.Fatalf("group for %s with %s", g.PublicKey.Curve, g.SHA)
	}
	k, err := x509.ParsePKIXPublicKey(g.PublicKeyDER)
	if err != nil {
		t.Fatalf("group key: %v", err)
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok {
		t.Fatalf("group key is a %T", k)
	}
	if u, err := pub.Bytes(); err != nil || !bytes.Equal(u, g.PublicKey.Uncompressed) {
		t.Fatalf("group key %x does not match its uncompressed form %x: %v", u, g.PublicKey.Uncompressed, err)
	}
	return pub
}
