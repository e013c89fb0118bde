// gen-vectors writes the test vectors of docs/FORMAT.md under
// testdata/vectors/, one scenario a file. Every value is derived from the
// scenario's name, so running it again writes the same files.
//
//	go run ./envelope/internal/gen-vectors
//
// Old vectors stay forever: a new format version adds files, and this program
// refuses to change an existing file's content.
package main

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/internal/softprf"
	"github.com/hsmd/hsmd/envelope/internal/vectors"
	"github.com/hsmd/hsmd/envelope/wire"
)

const dir = "testdata/vectors"

// det returns n bytes determined by label.
func det(label string, n int) []byte {
	var out []byte
	for i := 0; len(out) < n; i++ {
		h := sha256.Sum256([]byte(fmt.Sprintf("hsmd test vector %s %d", label, i)))
		out = append(out, h[:]...)
	}
	return out[:n]
}

type scenario struct {
	name, comment string
	kdkVersion    uint32
	tenant        string
	plaintext     []byte
	context       map[string]string
	// after turns a good vector into the scenario's (nil: success).
	after func(v *vectors.Vector)
	class string
}

func main() {
	var out []vectors.Vector
	for _, s := range scenarios() {
		out = append(out, build(s))
	}
	out = append(out, xwingVectors()...)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Fatal(err)
	}
	for _, v := range out {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			log.Fatal(err)
		}
		b = append(b, '\n')
		path := filepath.Join(dir, v.Name+".json")
		if old, err := os.ReadFile(path); err == nil && !bytes.Equal(old, b) {
			if v.XWingPrivateKey != nil {
				continue // HPKE encapsulation is random: written once, then kept (the tests check it)
			}
			log.Fatalf("%s exists with other content: vectors never change", path)
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			log.Fatal(err)
		}
	}
	log.Printf("wrote %d vectors to %s", len(out), dir)
}

func build(s scenario) vectors.Vector {
	v := vectors.Vector{
		Name: s.name, Class: vectors.Success, Comment: s.comment,
		KDKVersion: s.kdkVersion, KDK: det(s.name+"/kdk", 32),
		Tenant: s.tenant, TenantID: binary.BigEndian.Uint64(det(s.name+"/id", 8)) | 1, KeyVersion: 1,
		Salt: det(s.name+"/salt", 32), Context: s.context,
		Seed: det(s.name+"/seed", wire.SeedSize), Nonce: det(s.name+"/nonce", wire.NonceSize),
		Plaintext: s.plaintext,
	}
	// An independent computation of the key, for other implementations.
	var seed [wire.SeedSize]byte
	copy(seed[:], v.Seed)
	msg := wire.AppendDEKMessage(nil, v.Tenant, v.TenantID, v.KeyVersion, v.Salt, seed)
	m := hmac.New(sha256.New, v.KDK)
	m.Write(msg)
	v.IKM = m.Sum(nil)
	dek, err := hkdf.Key(sha256.New, v.IKM, nil, wire.SuiteLabel, 32)
	if err != nil {
		log.Fatal(err)
	}
	v.DEK = dek

	eng, err := envelope.New(envelope.Config{
		Deriver: softprf.New(map[uint32][]byte{v.KDKVersion: v.KDK}),
		Rand:    bytes.NewReader(append(bytes.Clone(v.Seed), v.Nonce...)),
	})
	if err != nil {
		log.Fatal(err)
	}
	ref := envelope.KeyRef{Tenant: v.Tenant, TenantID: v.TenantID, Version: v.KeyVersion, KDKVersion: v.KDKVersion}
	copy(ref.Salt[:], v.Salt)
	cts, err := eng.Seal(context.Background(), ref, []envelope.Item{{Plaintext: v.Plaintext, Context: v.Context}})
	if err != nil {
		log.Fatal(err)
	}
	v.Ciphertext = cts[0]
	if s.after != nil {
		s.after(&v)
		v.Class = s.class
	}
	return v
}

func flip(i int, mask byte) func(*vectors.Vector) {
	return func(v *vectors.Vector) {
		v.Ciphertext = bytes.Clone(v.Ciphertext)
		v.Ciphertext[i] ^= mask
		v.Plaintext = nil
	}
}

func scenarios() []scenario {
	hello := []byte("hello, world")
	ctx := map[string]string{"table": "users", "row": "42"}
	fail := vectors.AuthFail
	return []scenario{
		{name: "v1-success-empty", comment: "empty plaintext, no context", kdkVersion: 1, tenant: "acme", plaintext: []byte{}},
		{name: "v1-success-context", comment: "short plaintext, two context entries", kdkVersion: 1, tenant: "acme", plaintext: hello, context: ctx},
		{name: "v1-success-1kib", kdkVersion: 1, tenant: "acme.prod-eu_1", plaintext: det("1kib", 1024)},
		{name: "v1-success-kdk2", comment: "a tenant version deriving from kdk version 2", kdkVersion: 2, tenant: "acme", plaintext: hello},
		{name: "v1-success-text", comment: "the text form", kdkVersion: 1, tenant: "acme", plaintext: hello, context: ctx,
			after: func(v *vectors.Vector) { v.Text = wire.EncodeText(v.Ciphertext) }, class: vectors.Success},
		{name: "v1-auth-other-context", kdkVersion: 1, tenant: "acme", plaintext: hello, context: ctx, class: fail,
			after: func(v *vectors.Vector) {
				v.Context = map[string]string{"table": "users", "row": "43"}
				v.Plaintext = nil
			}},
		{name: "v1-auth-missing-context", kdkVersion: 1, tenant: "acme", plaintext: hello, context: ctx, class: fail,
			after: func(v *vectors.Vector) { v.Context = nil; v.Plaintext = nil }},
		{name: "v1-auth-other-tenant", comment: "the request names another tenant", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail,
			after: func(v *vectors.Vector) { v.RequestTenant = "globex"; v.Plaintext = nil }},
		{name: "v1-auth-tag", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail, after: flip(-1+wire.Overhead+len(hello), 0x80)},
		{name: "v1-auth-nonce", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail, after: flip(30, 0x01)},
		{name: "v1-auth-seed", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail, after: flip(14, 0x01)},
		{name: "v1-auth-key-version", comment: "an unknown key version", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail, after: flip(13, 0x02)},
		{name: "v1-auth-tenant-id", comment: "an unknown tenant id", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail, after: flip(9, 0x02)},
		{name: "v1-auth-body", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail, after: flip(wire.HeaderSize, 0x01)},
		{name: "v1-auth-truncated", kdkVersion: 1, tenant: "acme", plaintext: hello, class: fail,
			after: func(v *vectors.Vector) { v.Ciphertext = v.Ciphertext[:len(v.Ciphertext)-1]; v.Plaintext = nil }},
		{name: "v1-malformed-short", kdkVersion: 1, tenant: "acme", plaintext: []byte{}, class: vectors.Malformed,
			after: func(v *vectors.Vector) { v.Ciphertext = v.Ciphertext[:wire.Overhead-1]; v.Plaintext = nil }},
		{name: "v1-malformed-version", kdkVersion: 1, tenant: "acme", plaintext: hello, class: vectors.Malformed, after: flip(0, 0x03)},
		{name: "v1-malformed-suite", kdkVersion: 1, tenant: "acme", plaintext: hello, class: vectors.Malformed, after: flip(1, 0x80)},
		{name: "v1-malformed-text", kdkVersion: 1, tenant: "acme", plaintext: hello, class: vectors.Malformed,
			after: func(v *vectors.Vector) { v.Text = wire.TextPrefix + "not*base64"; v.Plaintext = nil }},
	}
}
