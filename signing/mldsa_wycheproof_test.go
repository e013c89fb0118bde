package signing_test

import (
	"errors"
	"testing"

	"filippo.io/mldsa"
	"github.com/cloudflare/circl/sign/mldsa/mldsa44"

	"github.com/hsmd/hsmd/internal/wycheproof"
)

// TestWycheproofMLDSA44 runs the Wycheproof ML-DSA-44 verification vectors
// through both ML-DSA-44 implementations on hsmd's checkpoint path. None
// of them can take a vector's message through hsmd's own API: a
// cosignature/v1 signature covers a subtree/v1 message built from a
// checkpoint, not arbitrary bytes. So each implementation is called as
// hsmd's path calls it:
//
//   - circl's mldsa44, with which MLDSASigner signs (mldsa44.SignTo in
//     mldsa.go): PublicKey.UnmarshalBinary, then mldsa44.Verify with the
//     vector's context;
//   - filippo.io/mldsa, which every verifier of hsmd's ML-DSA cosignatures
//     runs (audit.ParseVerifiers and quorum.NewVerifier go through
//     transparency-dev/formats/note): NewPublicKey(MLDSA44(), pk), then
//     Verify with nil options, or the vector's context.
//
// Valid vectors must verify under both and invalid ones under neither
// (wrong key or signature length, over-long context, modified or
// non-canonical signature). audit's TestWycheproofMLDSAVerifierKeys runs
// the vectors' public keys through hsmd's verifier key parsing.
func TestWycheproofMLDSA44(t *testing.T) {
	f := wycheproof.Load[wycheproof.MLDSAVerifyGroup](t, "mldsa_44_verify_test.json")
	var circl, filippo wycheproof.Stats
	for _, g := range f.Groups {
		var cpk mldsa44.PublicKey
		cerr := cpk.UnmarshalBinary(g.PublicKey)
		fpk, ferr := mldsa.NewPublicKey(mldsa.MLDSA44(), g.PublicKey)
		for _, v := range g.Tests {
			ok, err := false, cerr
			if cerr == nil {
				if ok = mldsa44.Verify(&cpk, v.Msg, v.Ctx, v.Sig); !ok {
					err = errors.New("mldsa44.Verify returned false")
				}
			}
			circl.Check(t, v.Case, ok, err)

			err = ferr
			if ferr == nil {
				var opts *mldsa.Options
				if v.Ctx != nil {
					opts = &mldsa.Options{Context: string(v.Ctx)}
				}
				err = mldsa.Verify(fpk, v.Msg, v.Sig, opts)
			}
			filippo.Check(t, v.Case, err == nil, err)
		}
	}
	circl.Report(t, "ML-DSA-44 (circl mldsa44, the signer's library)", wycheproof.Valid, wycheproof.Invalid)
	filippo.Report(t, "ML-DSA-44 (filippo.io/mldsa, the verifiers' library)", wycheproof.Valid, wycheproof.Invalid)
}
