package envelope_test

import (
	"bytes"
	"context"
	"crypto/hpke"
	"encoding/binary"
	"sort"
	"testing"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/internal/vectors"
)

// vectorXWing configures an Engine with the vector's X-Wing private key,
// if it has one.
func vectorXWing(t *testing.T, v *vectors.Vector) func(*envelope.Config) {
	if v.XWingPrivateKey == nil {
		return nil
	}
	priv, err := hpke.MLKEM768X25519().NewPrivateKey(v.XWingPrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(priv.PublicKey().Bytes(), v.XWingPublicKey) {
		t.Fatal("the vector's public key does not match its private key")
	}
	return func(c *envelope.Config) { c.XWing = vectorKey{priv} }
}

type vectorKey struct{ k hpke.PrivateKey }

func (v vectorKey) XWingKey(context.Context, envelope.KeyRef) (hpke.PrivateKey, error) {
	return v.k, nil
}

// checkXWingIndependently opens a suite 0x02 vector with crypto/hpke and
// an info and AAD built here from docs/FORMAT.md (hpkeInfo and hpkeAAD are
// in this file, not the wire package).
func checkXWingIndependently(t *testing.T, v *vectors.Vector) {
	priv, err := hpke.MLKEM768X25519().NewPrivateKey(v.XWingPrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	ct := v.Ciphertext
	info := append([]byte("hsmd/v1/xwing-hpke/hkdf-sha256/aes-256-gcm\x00"), ct[2:14]...)
	info = append(append(info, byte(len(v.Tenant))), v.Tenant...)
	r, err := hpke.NewRecipient(ct[14:14+1120], priv, hpke.HKDFSHA256(), hpke.AES256GCM(), info)
	if err != nil {
		t.Fatal(err)
	}
	aad := append(append(bytes.Clone(ct[:14]), byte(len(v.Tenant))), v.Tenant...)
	aad = appendContextByHand(aad, v.Context)
	pt, err := r.Open(aad, ct[14+1120:])
	if err != nil || !bytes.Equal(pt, v.Plaintext) {
		t.Fatalf("independent open: %v", err)
	}
}

// appendContextByHand is the context encoding of docs/FORMAT.md.
func appendContextByHand(aad []byte, ctx map[string]string) []byte {
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(ctx)))
	keys := make([]string, 0, len(ctx))
	for k := range ctx {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(k)))
		aad = append(aad, k...)
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(ctx[k])))
		aad = append(aad, ctx[k]...)
	}
	return aad
}
