package quorum_test

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/quorum"
)

func TestKeysInteroperate(t *testing.T) {
	op := shred("billing")
	// Keys made by the upstream generators load, and signatures made with
	// our signers verify under the upstream verifiers, and vice versa.
	edS, edV, err := note.GenerateKey(nil, "ed")
	if err != nil {
		t.Fatal(err)
	}
	mlS, mlV, err := tnote.GenerateMLDSAKey("ml")
	if err != nil {
		t.Fatal(err)
	}
	ours := newOperator(t, "ours", quorum.KeyMLDSA44)
	oursEd := newOperator(t, "oursed", quorum.KeyEd25519)
	req := request(t, op, time.Hour)
	for _, skey := range []string{edS, mlS} {
		s, err := quorum.NewSigner(skey)
		if err != nil {
			t.Fatal(err)
		}
		req = approve(t, req, operator{name: s.Name(), signer: s})
	}
	req = approve(t, req, ours, oursEd)
	mlUp, err := tnote.NewMLDSAVerifier(ours.vkey)
	if err != nil {
		t.Fatal(err)
	}
	edUp, err := note.NewVerifier(oursEd.vkey)
	if err != nil {
		t.Fatal(err)
	}
	var vs []note.Verifier
	for _, vkey := range []string{edV, mlV} {
		v, err := quorum.NewVerifier(vkey)
		if err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
	}
	n, err := note.Open(req, note.VerifierList(append(vs, mlUp, edUp)...))
	if err != nil || len(n.Sigs) != 4 {
		t.Fatalf("open: %v", err)
	}
}

func TestKeysErrorsHideSecrets(t *testing.T) {
	skey, vkey, err := quorum.GenerateKey(nil, "alice", quorum.KeyMLDSA44)
	if err != nil {
		t.Fatal(err)
	}
	// PRIVATE+KEY+name+hash+base64: the base64 may itself hold '+'.
	secret := strings.SplitN(skey, "+", 5)[4]
	for _, bad := range []string{
		skey[:len(skey)-4],                       // truncated
		strings.Replace(skey, "alice", "bob", 1), // hash mismatch
		strings.TrimPrefix(skey, "PRIVATE+KEY+"), // not a private key
		vkey,
	} {
		_, err := quorum.NewSigner(bad)
		if !errors.Is(err, quorum.ErrInvalidKey) {
			t.Errorf("NewSigner: %v, want ErrInvalidKey", err)
		}
		if err != nil && strings.Contains(err.Error(), secret[:12]) {
			t.Errorf("error quotes the private key: %v", err)
		}
	}
	if _, err := quorum.NewVerifier(strings.Replace(vkey, "alice", "bob", 1)); !errors.Is(err, quorum.ErrInvalidKey) {
		t.Errorf("verifier key with a wrong hash: %v, want ErrInvalidKey", err)
	}
	// ECDSA (type 0x02) is not an operator key type.
	if _, err := quorum.NewVerifier("x+00000000+AgAA"); !errors.Is(err, quorum.ErrUnsupportedKey) {
		t.Errorf("type 0x02: %v, want ErrUnsupportedKey", err)
	}
	if _, _, err := quorum.GenerateKey(nil, "has space", quorum.KeyEd25519); !errors.Is(err, quorum.ErrInvalidKey) {
		t.Errorf("name with a space: %v", err)
	}
	if _, _, err := quorum.GenerateKey(nil, "x", "rsa"); !errors.Is(err, quorum.ErrUnsupportedKey) {
		t.Errorf("rsa: %v", err)
	}
}

func TestPolicyValidate(t *testing.T) {
	alice, bob, _ := team(t)
	ok := func() *quorum.Policy { return policy(2, alice, bob) }
	if err := ok().Validate(); err != nil {
		t.Fatal(err)
	}
	for name, edit := range map[string]func(p *quorum.Policy){
		"threshold 0":        func(p *quorum.Policy) { p.Threshold = 0 },
		"threshold > n":      func(p *quorum.Policy) { p.Threshold = 3 },
		"no max validity":    func(p *quorum.Policy) { p.MaxValidity = 0 },
		"max validity 1y":    func(p *quorum.Policy) { p.MaxValidity = 365 * 24 * time.Hour },
		"duplicate name":     func(p *quorum.Policy) { p.Operators[1].Name = "alice" },
		"duplicate key":      func(p *quorum.Policy) { p.Operators[1] = p.Operators[0] },
		"key of other name":  func(p *quorum.Policy) { p.Operators[1].Name = "robert" },
		"bad key":            func(p *quorum.Policy) { p.Operators[1].Key = "bob+00000000+AQ==" },
		"no operators":       func(p *quorum.Policy) { p.Operators = nil },
		"name with + in it":  func(p *quorum.Policy) { p.Operators[1].Name = "b+b" },
		"unsupported type":   func(p *quorum.Policy) { p.Operators[1].Key = "bob+00000000+AgAA" },
		"same key, new name": func(p *quorum.Policy) { p.Operators = append(p.Operators, p.Operators[0]) },
		"one key under two valid names": func(p *quorum.Policy) {
			k := strings.SplitN(alice.vkey, "+", 3)[2]
			raw, _ := base64.StdEncoding.DecodeString(k)
			h := sha256.Sum256(append([]byte("alice2\n"), raw...))
			p.Operators = append(p.Operators, quorum.Operator{Name: "alice2", Key: fmt.Sprintf("alice2+%08x+%s", binary.BigEndian.Uint32(h[:4]), k)})
			if _, err := quorum.NewVerifier(p.Operators[2].Key); err != nil {
				t.Fatalf("the renamed key does not parse: %v", err)
			}
		},
	} {
		p := ok()
		edit(p)
		if err := p.Validate(); !errors.Is(err, quorum.ErrInvalidPolicy) {
			t.Errorf("%s: %v, want ErrInvalidPolicy", name, err)
		}
	}
}

func TestPolicyParseStrict(t *testing.T) {
	alice, bob, _ := team(t)
	good := "threshold: 2\noperators:\n  - name: alice\n    key: " + alice.vkey + "\n  - name: bob\n    key: " + bob.vkey + "\n"
	p, err := quorum.ParsePolicy([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if p.MaxValidity != quorum.DefaultMaxValidity || p.Threshold != 2 || len(p.Operators) != 2 {
		t.Fatalf("parsed %+v", p)
	}
	p, err = quorum.ParsePolicy([]byte("max_validity: 12h\n" + good))
	if err != nil || p.MaxValidity != 12*time.Hour {
		t.Fatalf("max_validity: %v, %v", p, err)
	}
	for name, b := range map[string]string{
		"unknown key":          "thresold: 2\n" + good,
		"unknown operator key": strings.Replace(good, "  - name: bob", "  - role: admin\n    name: bob", 1),
		"empty":                "",
		"two documents":        good + "---\nthreshold: 1\n",
		"bad duration":         "max_validity: forever\n" + good,
		"invalid":              strings.Replace(good, "threshold: 2", "threshold: 5", 1),
	} {
		if _, err := quorum.ParsePolicy([]byte(b)); !errors.Is(err, quorum.ErrInvalidPolicy) {
			t.Errorf("%s: %v, want ErrInvalidPolicy", name, err)
		}
	}
}
