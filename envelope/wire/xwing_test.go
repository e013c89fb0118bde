package wire_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/hsmd/hsmd/envelope/wire"
)

func xwingSample() []byte {
	ct := make([]byte, wire.XWingOverhead+3)
	wire.PutXWingPrefix(ct, 0x0102030405060708, 7)
	for i := wire.XWingPrefixSize; i < len(ct); i++ {
		ct[i] = byte(i)
	}
	return ct
}

// FuzzParseXWing: parse, rebuild, compare.
func FuzzParseXWing(f *testing.F) {
	f.Add(xwingSample())
	f.Add(xwingSample()[:wire.XWingOverhead])
	f.Fuzz(func(t *testing.T, in []byte) {
		h, enc, body, err := wire.ParseXWing(in)
		if err != nil {
			if !errors.Is(err, wire.ErrMalformed) {
				t.Fatal(err)
			}
			return
		}
		out := make([]byte, wire.XWingPrefixSize)
		wire.PutXWingPrefix(out, h.TenantID, h.KeyVersion)
		out = append(append(out, enc...), body...)
		if !bytes.Equal(out, in) || len(enc) != wire.XWingEncSize || len(body) < wire.TagSize {
			t.Fatalf("round trip changed the input")
		}
	})
}

func TestParseXWingErrors(t *testing.T) {
	s := xwingSample()
	for name, in := range map[string][]byte{
		"short":   s[:wire.XWingOverhead-1],
		"version": append([]byte{2}, s[1:]...),
		"suite":   append([]byte{1, 1}, s[2:]...),
	} {
		if _, _, _, err := wire.ParseXWing(in); !errors.Is(err, wire.ErrMalformed) {
			t.Errorf("%s: got %v", name, err)
		}
	}
	// Suite 0x01's parser refuses suite 0x02.
	if _, _, err := wire.Parse(s); !errors.Is(err, wire.ErrMalformed) {
		t.Errorf("Parse accepted suite 2: %v", err)
	}
}
