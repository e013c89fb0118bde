package softprf

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/hsmd/hsmd/internal/wycheproof"
)

// TestWycheproofHMAC runs every Wycheproof HMAC-SHA256 vector through the
// software PRF that stands in for the HSM in the envelope's tests and
// generates its vectors under testdata/: with hsm's TestWycheproofHSMPRF
// passing the same vectors, the two PRFs agree. Truncated tags are
// compared with the prefix of the full HMAC.
func TestWycheproofHMAC(t *testing.T) {
	f := wycheproof.Load[wycheproof.MACGroup](t, "hmac_sha256_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			mac, err := New(map[uint32][]byte{1: v.Key}).PRF(context.Background(), 1, v.Msg)
			if err == nil && (len(mac) != 32 || !bytes.Equal(mac[:min(len(v.Tag), len(mac))], v.Tag)) {
				err = fmt.Errorf("HMAC %x, tag %x", mac, v.Tag)
			}
			st.Check(t, v.Case, err == nil, err)
		}
	}
	st.Report(t, "HMAC-SHA256 (softprf)", wycheproof.Valid, wycheproof.Invalid)
}
