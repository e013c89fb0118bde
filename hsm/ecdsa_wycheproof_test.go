package hsm

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"testing"

	"github.com/hsmd/hsmd/internal/wycheproof"
)

// TestWycheproofRawToDER runs the Wycheproof ECDSA P-256 SHA-256 vectors
// in the PKCS#11 / IEEE P1363 encoding (r || s, what CKM_ECDSA returns)
// through rawToDER, the conversion the HSM signer applies before it hands
// a signature to its caller, and then ecdsa.VerifyASN1 over SHA-256 of the
// message, as signing.NoteSigner and every type 0x02 note verifier check
// it. A valid vector must convert and verify; an invalid one must fail
// one of the two (rawToDER refuses r || s of any length but 64 bytes: the
// SignatureSize vectors such as tcId 125, "0505", whose r and s would
// otherwise verify).
func TestWycheproofRawToDER(t *testing.T) {
	f := wycheproof.Load[wycheproof.ECDSAGroup](t, "ecdsa_secp256r1_sha256_p1363_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		k, err := x509.ParsePKIXPublicKey(g.PublicKeyDER)
		pub, ok := k.(*ecdsa.PublicKey)
		if err != nil || !ok || g.SHA != "SHA-256" {
			t.Fatalf("group key %T (%v) with %s", k, err, g.SHA)
		}
		for _, v := range g.Tests {
			digest := sha256.Sum256(v.Msg)
			der, err := rawToDER(v.Sig)
			ok := err == nil && ecdsa.VerifyASN1(pub, digest[:], der)
			st.Check(t, v.Case, ok, err)
		}
	}
	st.Report(t, "ECDSA P-256 P1363 (rawToDER + VerifyASN1)", wycheproof.Valid, wycheproof.Invalid)
}
