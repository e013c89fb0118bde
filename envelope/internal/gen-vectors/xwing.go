package main

import (
	"bytes"
	"crypto/hpke"
	"encoding/binary"
	"log"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/internal/vectors"
	"github.com/hsmd/hsmd/envelope/wire"
)

// xwingVectors are the vectors of suite 0x02 (X-Wing HPKE). The key pair
// is derived from the scenario's name; the encapsulation is random
// (crypto/hpke draws it from crypto/rand and takes no reader), so main
// writes these files once and keeps them afterwards.
func xwingVectors() []vectors.Vector {
	hello := []byte("hello, world")
	ctx := map[string]string{"table": "users", "row": "42"}
	fail := vectors.AuthFail
	type sc struct {
		name, comment string
		plaintext     []byte
		context       map[string]string
		after         func(v *vectors.Vector)
		class         string
	}
	var out []vectors.Vector
	for _, s := range []sc{
		{name: "v1-xwing-success-empty", comment: "suite 0x02, empty plaintext, no context", plaintext: []byte{}},
		{name: "v1-xwing-success-context", comment: "suite 0x02, two context entries", plaintext: hello, context: ctx},
		{name: "v1-xwing-success-text", comment: "suite 0x02, the text form", plaintext: hello, context: ctx,
			after: func(v *vectors.Vector) { v.Text = wire.EncodeText(v.Ciphertext) }, class: vectors.Success},
		{name: "v1-xwing-auth-other-context", plaintext: hello, context: ctx, class: fail,
			after: func(v *vectors.Vector) {
				v.Context = map[string]string{"table": "users", "row": "43"}
				v.Plaintext = nil
			}},
		{name: "v1-xwing-auth-other-tenant", comment: "the request names another tenant", plaintext: hello, class: fail,
			after: func(v *vectors.Vector) { v.RequestTenant = "globex"; v.Plaintext = nil }},
		{name: "v1-xwing-auth-key-version", comment: "an unknown key version", plaintext: hello, class: fail, after: flip(13, 0x02)},
		{name: "v1-xwing-auth-tenant-id", comment: "an unknown tenant id", plaintext: hello, class: fail, after: flip(9, 0x02)},
		{name: "v1-xwing-auth-enc", comment: "a changed encapsulation", plaintext: hello, class: fail, after: flip(wire.XWingPrefixSize+100, 0x01)},
		{name: "v1-xwing-auth-tag", plaintext: hello, class: fail, after: flip(wire.XWingOverhead+len(hello)-1, 0x80)},
		{name: "v1-xwing-auth-truncated", plaintext: hello, class: fail,
			after: func(v *vectors.Vector) { v.Ciphertext = v.Ciphertext[:len(v.Ciphertext)-1]; v.Plaintext = nil }},
		{name: "v1-xwing-malformed-short", plaintext: []byte{}, class: vectors.Malformed,
			after: func(v *vectors.Vector) { v.Ciphertext = v.Ciphertext[:wire.XWingOverhead-1]; v.Plaintext = nil }},
	} {
		kem, _, _ := envelope.XWingSuite()
		priv, err := kem.NewPrivateKey(det(s.name+"/xwing", wire.XWingPrivateKeySize))
		if err != nil {
			log.Fatal(err)
		}
		v := vectors.Vector{
			Name: s.name, Class: vectors.Success, Comment: s.comment,
			KDKVersion: 1, KDK: det(s.name+"/kdk", 32),
			Tenant: "acme", TenantID: binary.BigEndian.Uint64(det(s.name+"/id", 8)) | 1, KeyVersion: 1,
			Salt: det(s.name+"/salt", 32), Context: s.context, Plaintext: s.plaintext,
			XWingPrivateKey: mustBytes(priv), XWingPublicKey: priv.PublicKey().Bytes(),
		}
		if v.Ciphertext, err = envelope.SealXWing(priv.PublicKey(), v.Tenant, v.TenantID, v.KeyVersion, v.Plaintext, v.Context); err != nil {
			log.Fatal(err)
		}
		if s.after != nil {
			s.after(&v)
			v.Class = s.class
		}
		v.Ciphertext = bytes.Clone(v.Ciphertext)
		out = append(out, v)
	}
	return out
}

func mustBytes(k hpke.PrivateKey) []byte {
	b, err := k.Bytes()
	if err != nil {
		log.Fatal(err)
	}
	return b
}
