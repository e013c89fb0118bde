package server_test

import (
	"bytes"
	"errors"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/hsmd/hsmd/server"
)

// authzSeeds are realistic policies and broken ones.
var authzSeeds = []string{
	`principals:
  - name: billing-svc
    match: ["spiffe://example.org/billing"]
    tenants: ["billing", "billing-*"]
    operations: [encrypt, decrypt, rewrap]
  - name: reporting
    match: ["cn:reporting", "uid:1000", "gid:50"]
    tenants: ["billing"]
    operations: [decrypt]
  - name: ops
    match: ["uid:0"]
    tenants: ["*"]
    operations: [key-admin, tenant-admin, audit-sign, public-key, datakey, audit-read]
`,
	"principals: []\n",
	"",
	"principals:\n  - name: a\n    match: [\"uid:1\"]\n    tenants: [\"[\"]\n    operations: [encrypt]\n", // bad pattern
	"principals:\n  - name: a\n    match: [\"uid:x\"]\n    tenants: [t]\n    operations: [encrypt]\n",     // bad uid
	"principals:\n  - name: a\n    match: [\"uid:1\"]\n    tenants: [t]\n    operations: [fly]\n",         // bad op
	"principals:\n  - name: a\n    match: [\"uid:1\"]\n    tenants: [t]\n    operations: [encrypt]\n  - name: a\n    match: [\"uid:2\"]\n    tenants: [t]\n    operations: [encrypt]\n",
	"principals:\n  - name: a\n    nickname: b\n", // unknown key
	"principals: &p [*p]\n",                       // alias loop
	"principals:\n  - &x {name: a, match: [\"cn:a\"], tenants: [t], operations: [encrypt]}\n  - *x\n",
	"principals: {}\n", "- 1\n", "principals:\n  - name: [a]\n", "\t", "principals: !!binary AAAA\n",
}

// FuzzParsePolicy: ParsePolicy never panics, its errors match ErrPolicy,
// input over MaxPolicySize is refused before decoding, and an accepted
// policy marshals to YAML that parses to the same policy (parse, marshal,
// parse, marshal is a fixed point). Allow never panics on it.
func FuzzParsePolicy(f *testing.F) {
	if len(authzSeeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for i, s := range authzSeeds {
		f.Add([]byte(s))
		if _, err := server.ParsePolicy([]byte(s)); i < 3 && err != nil {
			f.Fatalf("valid seed %d is refused: %v", i, err)
		}
	}
	big := append([]byte("principals: []\n#"), bytes.Repeat([]byte("x"), server.MaxPolicySize)...)
	if _, err := server.ParsePolicy(big); !errors.Is(err, server.ErrPolicy) {
		f.Fatalf("a policy over MaxPolicySize: %v", err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := server.ParsePolicy(b)
		if err != nil {
			if !errors.Is(err, server.ErrPolicy) {
				t.Fatalf("error %v does not match ErrPolicy", err)
			}
			return
		}
		m1, err := yaml.Marshal(p)
		if err != nil {
			t.Fatalf("an accepted policy does not marshal: %v", err)
		}
		p2, err := server.ParsePolicy(m1)
		if err != nil {
			t.Fatalf("an accepted policy marshals to one that is refused: %v\n%s", err, m1)
		}
		m2, err := yaml.Marshal(p2)
		if err != nil || !bytes.Equal(m1, m2) {
			t.Fatalf("marshal is not stable:\n%s\n%s", m1, m2)
		}
		for _, pr := range p.Principals {
			for _, op := range pr.Operations {
				p.Allow(pr.Match, op, "billing", true)
				p.Allow(pr.Match, op, "", true)
			}
		}
	})
}
