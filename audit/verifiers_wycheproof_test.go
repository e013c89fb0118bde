package audit_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"

	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/internal/wycheproof"
	"github.com/hsmd/hsmd/signing"
)

// publicOnly is a crypto.Signer that only has a public key: enough for
// signing.NewNoteSigner to compute the verifier key hsmd publishes.
type publicOnly struct{ pub crypto.PublicKey }

func (p publicOnly) Public() crypto.PublicKey { return p.pub }
func (p publicOnly) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("publicOnly: no private key")
}

// checkpointVerifier returns the verifier audit.Verify would use for pub:
// the verifier key a NoteSigner over pub publishes, parsed by
// audit.ParseVerifiers. Verify(msg, sig) on it is the signature check
// note.Open runs for each signature line of a checkpoint.
func checkpointVerifier(t *testing.T, pub crypto.PublicKey) note.Verifier {
	t.Helper()
	ns, err := signing.NewNoteSigner("wycheproof.test/log", publicOnly{pub})
	if err != nil {
		t.Fatalf("NewNoteSigner: %v", err)
	}
	vs, err := audit.ParseVerifiers([]string{ns.VerifierKey()})
	if err != nil || len(vs) != 1 {
		t.Fatalf("ParseVerifiers(%q) = %d verifiers, %v", ns.VerifierKey(), len(vs), err)
	}
	if vs[0].KeyHash() != ns.KeyHash() || vs[0].Name() != ns.Name() {
		t.Fatalf("verifier %s+%08x, signer %s+%08x", vs[0].Name(), vs[0].KeyHash(), ns.Name(), ns.KeyHash())
	}
	return vs[0]
}

// TestWycheproofCheckpointVerifierECDSA runs the Wycheproof ECDSA P-256
// SHA-256 vectors with DER signatures (a type 0x02 note signature holds
// DER: transparency-dev/formats/note's verifier runs ecdsa.VerifyASN1 over
// SHA-256 of the note text) through the verifier audit.Verify checks
// hsmd's checkpoints with. The vectors' messages are not note texts, so
// they go to the verifier's Verify directly rather than through note.Open.
func TestWycheproofCheckpointVerifierECDSA(t *testing.T) {
	f := wycheproof.Load[wycheproof.ECDSAGroup](t, "ecdsa_secp256r1_sha256_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		k, err := x509.ParsePKIXPublicKey(g.PublicKeyDER)
		pub, ok := k.(*ecdsa.PublicKey)
		if err != nil || !ok || g.SHA != "SHA-256" {
			t.Fatalf("group key %T (%v) with %s", k, err, g.SHA)
		}
		v := checkpointVerifier(t, pub)
		for _, c := range g.Tests {
			st.Check(t, c.Case, v.Verify(c.Msg, c.Sig), nil)
		}
	}
	st.Report(t, "ECDSA P-256 DER (audit.ParseVerifiers)", wycheproof.Valid, wycheproof.Invalid)
}

// TestWycheproofCheckpointVerifierEd25519 runs the Wycheproof Ed25519
// vectors through the type 0x01 verifier audit.Verify checks hsmd's
// checkpoints with (golang.org/x/mod/sumdb/note's, via formats/note).
func TestWycheproofCheckpointVerifierEd25519(t *testing.T) {
	f := wycheproof.Load[wycheproof.EdDSAGroup](t, "ed25519_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		if len(g.PublicKey.PK) != ed25519.PublicKeySize {
			t.Fatalf("Ed25519 group key of %d bytes", len(g.PublicKey.PK))
		}
		v := checkpointVerifier(t, ed25519.PublicKey(g.PublicKey.PK))
		for _, c := range g.Tests {
			st.Check(t, c.Case, v.Verify(c.Msg, c.Sig), nil)
		}
	}
	st.Report(t, "Ed25519 (audit.ParseVerifiers)", wycheproof.Valid, wycheproof.Invalid)
}

// mldsaVerifierKey is the verifier key "name+hash+base64(0x06 || pk)" of
// an ML-DSA-44 cosignature/v1 key, as signing.MLDSASigner.VerifierKey
// writes it, for any pk (also of the wrong length).
func mldsaVerifierKey(name string, pk []byte) string {
	typed := append([]byte{signing.TypeMLDSA44Cosi}, pk...)
	h := sha256.Sum256(slices.Concat([]byte(name+"\n"), typed))
	return fmt.Sprintf("%s+%08x+%s", name, binary.BigEndian.Uint32(h[:]), base64.StdEncoding.EncodeToString(typed))
}

// TestWycheproofMLDSAVerifierKeys runs the public keys of the Wycheproof
// ML-DSA-44 verification vectors through audit.ParseVerifiers. A vector
// whose key is refused counts as rejected and must be invalid; a vector
// flagged IncorrectPublicKeyLength must have its key refused. The other
// vectors are skipped here: a cosignature/v1 verifier checks signatures
// over subtree/v1 messages built from checkpoints, not over the vectors'
// messages (signing's TestWycheproofMLDSA44 checks their signatures with
// the library this verifier calls).
func TestWycheproofMLDSAVerifierKeys(t *testing.T) {
	f := wycheproof.Load[wycheproof.MLDSAVerifyGroup](t, "mldsa_44_verify_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		vkey := mldsaVerifierKey("wycheproof.test/witness", g.PublicKey)
		_, err := audit.ParseVerifiers([]string{vkey})
		for _, c := range g.Tests {
			badKey := slices.Contains(c.Flags, "IncorrectPublicKeyLength")
			switch {
			case err != nil:
				st.Check(t, c.Case, false, err)
			case badKey:
				t.Errorf("%v: ParseVerifiers accepted a %d-byte ML-DSA-44 public key", c.Case, len(g.PublicKey))
			default:
				st.Skip("key accepted; the signature is checked by signing's TestWycheproofMLDSA44")
			}
		}
	}
	st.Report(t, "ML-DSA-44 public keys (audit.ParseVerifiers)", wycheproof.Invalid)
}
