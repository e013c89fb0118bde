package quorum_test

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"

	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/internal/wycheproof"
	"github.com/hsmd/hsmd/quorum"
)

// TestWycheproofOperatorEd25519 runs the Wycheproof Ed25519 vectors
// through the verifier quorum.NewVerifier makes of an operator's Ed25519
// key: its Verify(msg, sig) is the check note.Open runs on each signature
// of an approval.
func TestWycheproofOperatorEd25519(t *testing.T) {
	f := wycheproof.Load[wycheproof.EdDSAGroup](t, "ed25519_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		vkey, err := note.NewEd25519VerifierKey("operator", ed25519.PublicKey(g.PublicKey.PK))
		if err != nil {
			t.Fatal(err)
		}
		v, err := quorum.NewVerifier(vkey)
		if err != nil {
			t.Fatalf("NewVerifier(%q): %v", vkey, err)
		}
		for _, c := range g.Tests {
			st.Check(t, c.Case, v.Verify(c.Msg, c.Sig), nil)
		}
	}
	st.Report(t, "Ed25519 (quorum.NewVerifier)", wycheproof.Valid, wycheproof.Invalid)
}

// TestWycheproofOperatorMLDSAKeys runs the public keys of the Wycheproof
// ML-DSA-44 vectors through quorum.NewVerifier. As in audit's
// TestWycheproofMLDSAVerifierKeys, a refused key rejects its vectors (they
// must be invalid), a key flagged IncorrectPublicKeyLength must be
// refused, and the other vectors are skipped: an approval's ML-DSA
// signature is a cosignature/v1 over a subtree/v1 message, not over the
// vectors' messages (signing's TestWycheproofMLDSA44 checks those with the
// same library).
func TestWycheproofOperatorMLDSAKeys(t *testing.T) {
	f := wycheproof.Load[wycheproof.MLDSAVerifyGroup](t, "mldsa_44_verify_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		typed := append([]byte{quorum.TypeMLDSA44}, g.PublicKey...)
		h := sha256.Sum256(slices.Concat([]byte("operator\n"), typed))
		vkey := fmt.Sprintf("operator+%08x+%s", binary.BigEndian.Uint32(h[:]), base64.StdEncoding.EncodeToString(typed))
		_, err := quorum.NewVerifier(vkey)
		if err != nil && !errors.Is(err, quorum.ErrInvalidKey) {
			t.Errorf("NewVerifier: %v, want an error wrapping ErrInvalidKey", err)
		}
		for _, c := range g.Tests {
			switch {
			case err != nil:
				st.Check(t, c.Case, false, err)
			case slices.Contains(c.Flags, "IncorrectPublicKeyLength"):
				t.Errorf("%v: NewVerifier accepted a %d-byte ML-DSA-44 public key", c.Case, len(g.PublicKey))
			default:
				st.Skip("key accepted; the signature is checked by signing's TestWycheproofMLDSA44")
			}
		}
	}
	st.Report(t, "ML-DSA-44 public keys (quorum.NewVerifier)", wycheproof.Invalid)
}
