package envelope_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"sort"
	"testing"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/internal/softprf"
	"github.com/hsmd/hsmd/envelope/internal/vectors"
)

const vectorDir = "../testdata/vectors"

func vectorRef(v *vectors.Vector) envelope.KeyRef {
	r := envelope.KeyRef{Tenant: v.Tenant, TenantID: v.TenantID, Version: v.KeyVersion, KDKVersion: v.KDKVersion}
	copy(r.Salt[:], v.Salt)
	return r
}

func TestVectors(t *testing.T) {
	vs, err := vectors.Load(vectorDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		t.Run(v.Name, func(t *testing.T) {
			e := newEngine(t, softprf.New(map[uint32][]byte{v.KDKVersion: v.KDK}), vectorXWing(t, &v))
			data := []byte(v.Text)
			if v.Text == "" {
				data = v.Ciphertext
			}
			res := mustOpen(t, e, context.Background(), resolver(v.RequestTenant, vectorRef(&v)), []envelope.Ciphertext{{Data: data, Context: v.Context}})
			switch v.Class {
			case vectors.Success:
				if res[0].Err != nil || !bytes.Equal(res[0].Plaintext, v.Plaintext) {
					t.Fatalf("open: %v", res[0].Err)
				}
				if v.XWingPrivateKey != nil {
					checkXWingIndependently(t, &v)
					break
				}
				checkIndependently(t, &v)
				reseal(t, &v)
			case vectors.AuthFail:
				if res[0].Err != envelope.ErrDecrypt {
					t.Fatalf("got %v, want exactly ErrDecrypt", res[0].Err)
				}
			case vectors.Malformed:
				if !errors.Is(res[0].Err, envelope.ErrMalformed) {
					t.Fatalf("got %v, want ErrMalformed", res[0].Err)
				}
			default:
				t.Fatalf("unknown class %q", v.Class)
			}
		})
	}
}

// reseal checks that sealing with the vector's seed and nonce writes the
// same bytes: the format does not drift.
func reseal(t *testing.T, v *vectors.Vector) {
	e := newEngine(t, softprf.New(map[uint32][]byte{v.KDKVersion: v.KDK}), func(c *envelope.Config) {
		c.Rand = bytes.NewReader(append(bytes.Clone(v.Seed), v.Nonce...))
	})
	cts, err := e.Seal(context.Background(), vectorRef(v), []envelope.Item{{Plaintext: v.Plaintext, Context: v.Context}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cts[0], v.Ciphertext) {
		t.Fatalf("resealed\n %x\nwant\n %x", cts[0], v.Ciphertext)
	}
}

// checkIndependently opens the vector with the DEK it lists and an AAD built
// here from docs/FORMAT.md, without the envelope or wire packages.
func checkIndependently(t *testing.T, v *vectors.Vector) {
	aad := append([]byte{}, v.Ciphertext[:42]...)
	aad = append(aad, byte(len(v.Tenant)))
	aad = append(aad, v.Tenant...)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(v.Context)))
	keys := make([]string, 0, len(v.Context))
	for k := range v.Context {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(k)))
		aad = append(aad, k...)
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(v.Context[k])))
		aad = append(aad, v.Context[k]...)
	}
	block, _ := aes.NewCipher(v.DEK)
	gcm, _ := cipher.NewGCM(block)
	pt, err := gcm.Open(nil, v.Ciphertext[30:42], v.Ciphertext[42:], aad)
	if err != nil || !bytes.Equal(pt, v.Plaintext) {
		t.Fatalf("independent open: %v", err)
	}
}
