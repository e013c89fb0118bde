package envelope_test

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"testing"

	"github.com/hsmd/hsmd/envelope/wire"
	"github.com/hsmd/hsmd/internal/wycheproof"
)

// TestWycheproofAESGCM runs the Wycheproof AES-GCM vectors of suite 0x01's
// parameters (256-bit key, 96-bit nonce, 128-bit tag: wire.NonceSize and
// wire.TagSize) through the AEAD the envelope seals and opens items with:
// derive (dek.go) builds it as cipher.NewGCM(aes.NewCipher(DEK)), and
// SealTo and Open call its Seal and Open with the header's nonce and the
// AAD. The key itself is an HKDF output there, so the vectors' keys go
// into the same two calls directly. A valid vector must seal to exactly
// ct || tag and open; an invalid one must not open, and, as Open relies
// on ("Open cleared its output"), must leave the plaintext slot zeroed.
func TestWycheproofAESGCM(t *testing.T) {
	f := wycheproof.Load[wycheproof.AEADGroup](t, "aes_gcm_test.json")
	var st wycheproof.Stats
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			switch {
			case len(v.Key) != 32:
				st.Skip("key not 256-bit (suite 0x01 is AES-256)")
				continue
			case len(v.IV) != wire.NonceSize:
				st.Skip("IV not 96-bit (the format's nonce size)")
				continue
			case len(v.Tag) != wire.TagSize:
				st.Skip("tag not 128-bit")
				continue
			}
			ok, err := envelopeAEADCase(t, v)
			st.Check(t, v.Case, ok, err)
		}
	}
	st.Report(t, "AES-256-GCM (envelope AEAD)", wycheproof.Valid, wycheproof.Invalid)
}

// envelopeAEADCase reports whether v was accepted: sealed to exactly
// ct || tag and opened to msg. An error explains a rejection. A failed
// Open that leaves bytes in its output fails t.
func envelopeAEADCase(t *testing.T, v wycheproof.AEADTest) (bool, error) {
	block, err := aes.NewCipher(v.Key)
	if err != nil {
		return false, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return false, err
	}
	sealed := append(bytes.Clone(v.CT), v.Tag...)
	// dst as Open gets it: an empty slice with room for the plaintext,
	// here pre-filled so that clearing on failure shows.
	room := bytes.Repeat([]byte{0xa5}, len(v.CT))
	pt, openErr := aead.Open(room[:0], v.IV, sealed, v.AAD)
	if openErr != nil {
		if !allZero(room) {
			t.Errorf("%v: failed Open left bytes in its output", v.Case)
		}
		return false, openErr
	}
	if !bytes.Equal(pt, v.Msg) {
		return false, fmt.Errorf("opened to %x, want %x", pt, v.Msg)
	}
	if got := aead.Seal(nil, v.IV, v.Msg, v.AAD); !bytes.Equal(got, sealed) {
		return false, fmt.Errorf("sealed to %x, want %x", got, sealed)
	}
	return true, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
