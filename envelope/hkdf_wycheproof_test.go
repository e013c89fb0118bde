package envelope_test

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"testing"

	"github.com/hsmd/hsmd/internal/wycheproof"
)

// TestWycheproofHKDF runs every Wycheproof HKDF-SHA256 vector through
// crypto/hkdf.Key with SHA-256, the call derive (dek.go) makes to expand
// the HSM's PRF output into a data key: hkdf.Key(sha256.New, ikm, nil,
// wire.SuiteLabel, 32). Valid vectors must give exactly okm; the invalid
// ones (an output longer than 255 hash blocks) must fail. derive passes a
// nil salt: for the vectors with an empty salt, nil must give the same
// key (RFC 5869: no salt is HashLen zero bytes).
func TestWycheproofHKDF(t *testing.T) {
	f := wycheproof.Load[wycheproof.HKDFGroup](t, "hkdf_sha256_test.json")
	var st wycheproof.Stats
	nilSalt := 0
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			okm, err := hkdf.Key(sha256.New, v.IKM, v.Salt, string(v.Info), v.Size)
			if err == nil && !bytes.Equal(okm, v.OKM) {
				err = fmt.Errorf("okm %x, want %x", okm, v.OKM)
			}
			st.Check(t, v.Case, err == nil, err)
			if len(v.Salt) == 0 && v.Result == wycheproof.Valid {
				nilSalt++
				if got, err := hkdf.Key(sha256.New, v.IKM, nil, string(v.Info), v.Size); err != nil || !bytes.Equal(got, v.OKM) {
					t.Errorf("%v: with a nil salt: okm %x, %v; want %x", v.Case, got, err, v.OKM)
				}
			}
		}
	}
	st.Report(t, "HKDF-SHA256", wycheproof.Valid, wycheproof.Invalid)
	t.Logf("HKDF-SHA256: %d valid vectors with an empty salt also run with a nil salt", nilSalt)
	if nilSalt == 0 {
		t.Error("no vector with an empty salt: the nil-salt form derive uses went untested")
	}
}
