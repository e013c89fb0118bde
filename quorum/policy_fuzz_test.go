package quorum_test

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/hsmd/hsmd/quorum"
)

// FuzzParsePolicy: quorum.ParsePolicy never panics, its errors match
// ErrInvalidPolicy, input over its size cap is refused, and an accepted
// policy marshals to YAML that parses to the same policy (parse, marshal,
// parse, marshal is a fixed point) and validates.
func FuzzParsePolicy(f *testing.F) {
	alice, bob := newOperator(f, "alice", quorum.KeyEd25519), newOperator(f, "bob", quorum.KeyMLDSA44)
	good := fmt.Sprintf("threshold: 2\nmax_validity: 72h\noperators:\n  - name: alice\n    key: %s\n  - name: bob\n    key: %s\n", alice.vkey, bob.vkey)
	seeds := []string{
		good,
		fmt.Sprintf("threshold: 1\noperators:\n  - {name: alice, key: %q}\n", alice.vkey), // default max_validity
		fmt.Sprintf("threshold: 3\noperators:\n  - name: alice\n    key: %s\n", alice.vkey),
		fmt.Sprintf("threshold: 1\nmax_validity: 800h\noperators:\n  - name: alice\n    key: %s\n", alice.vkey),
		fmt.Sprintf("threshold: 1\noperators:\n  - name: bob\n    key: %s\n", alice.vkey), // key named otherwise
		fmt.Sprintf("threshold: 1\noperators:\n  - name: alice\n    key: %s\n  - name: al\n    key: %s\n", alice.vkey, alice.vkey),
		good + "---\nthreshold: 1\n", good + "quorum: 2\n",
		"", "threshold: -1\n", "operators: [&a {name: x}, *a]\n", "max_validity: 1\n", "threshold: 99999999999999999999\n",
	}
	for i, s := range seeds {
		f.Add([]byte(s))
		if _, err := quorum.ParsePolicy([]byte(s)); i < 2 && err != nil {
			f.Fatalf("valid seed %d is refused: %v", i, err)
		}
	}
	if _, err := quorum.ParsePolicy(append([]byte(good+"#"), bytes.Repeat([]byte("x"), 1<<20)...)); !errors.Is(err, quorum.ErrInvalidPolicy) {
		f.Fatalf("a policy over 1 MiB: %v", err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := quorum.ParsePolicy(b)
		if err != nil {
			if !errors.Is(err, quorum.ErrInvalidPolicy) {
				t.Fatalf("error %v does not match ErrInvalidPolicy", err)
			}
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("an accepted policy does not validate: %v", err)
		}
		m1, err := yaml.Marshal(p)
		if err != nil {
			t.Fatalf("an accepted policy does not marshal: %v", err)
		}
		p2, err := quorum.ParsePolicy(m1)
		if err != nil {
			t.Fatalf("an accepted policy marshals to one that is refused: %v\n%s", err, m1)
		}
		m2, err := yaml.Marshal(p2)
		if err != nil || !bytes.Equal(m1, m2) || p2.MaxValidity != p.MaxValidity || p2.Threshold != p.Threshold {
			t.Fatalf("round trip changed the policy:\n%s\n%s", m1, m2)
		}
	})
}
