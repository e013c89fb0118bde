package quorum

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"
	"gopkg.in/yaml.v3"
)

// Policy defaults and bounds.
const (
	// DefaultMaxValidity is ParsePolicy's MaxValidity when max_validity is
	// left out.
	DefaultMaxValidity = 72 * time.Hour
	// MaxValidityLimit is the largest MaxValidity Validate accepts.
	MaxValidityLimit = 31 * 24 * time.Hour
	maxPolicySize    = 1 << 20
)

// Operator is a registered approver: a Name and a verifier key in C2SP
// signed-note form "name+hash+base64(type||key)" whose name is Name.
type Operator struct {
	Name string `yaml:"name"`
	Key  string `yaml:"key"`
}

// Policy says who may approve (Operators), how many distinct operators
// must (Threshold), and how long a request may be valid (MaxValidity).
// A Policy is read-only once in use; its methods are then safe for
// concurrent use.
type Policy struct {
	Operators   []Operator    `yaml:"operators"`
	Threshold   int           `yaml:"threshold"`
	MaxValidity time.Duration `yaml:"max_validity"`
}

// Validate checks that operator names and keys are unique, each key parses
// (NewVerifier) and carries its operator's name, Threshold is 1 to the
// number of operators, and MaxValidity is positive and at most
// MaxValidityLimit. Errors wrap ErrInvalidPolicy and name the YAML path.
func (p *Policy) Validate() error {
	_, _, err := p.verifiers()
	return err
}

type nameHash struct {
	name string
	hash uint32
}

// verifiers validates p and returns its verifiers and the operator of each
// (key name, key hash).
func (p *Policy) verifiers() ([]note.Verifier, map[nameHash]string, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidPolicy, fmt.Sprintf(format, a...))
	}
	if len(p.Operators) == 0 {
		return nil, nil, bad("operators: at least one is required")
	}
	if p.Threshold < 1 || p.Threshold > len(p.Operators) {
		return nil, nil, bad("threshold must be between 1 and %d (the number of operators), not %d", len(p.Operators), p.Threshold)
	}
	if p.MaxValidity <= 0 || p.MaxValidity > MaxValidityLimit {
		return nil, nil, bad("max_validity must be positive and at most %v, not %v", MaxValidityLimit, p.MaxValidity)
	}
	vs := make([]note.Verifier, 0, len(p.Operators))
	byKey := make(map[nameHash]string, len(p.Operators))
	names := make(map[string]bool, len(p.Operators))
	keys := make(map[string]bool, len(p.Operators))
	for i, o := range p.Operators {
		switch {
		case !validName(o.Name):
			return nil, nil, bad("operators[%d].name %.40q: want 1-%d bytes of UTF-8 without spaces or '+'", i, o.Name, MaxNameLen)
		case names[o.Name]:
			return nil, nil, bad("operators[%d].name %q is registered twice", i, o.Name)
		case keys[keyMaterial(o.Key)]:
			// Compared without the name: a signature does not cover the
			// name, so one key under two names would count twice.
			return nil, nil, bad("operators[%d].key (%s) is registered twice", i, o.Name)
		}
		names[o.Name], keys[keyMaterial(o.Key)] = true, true
		v, err := NewVerifier(o.Key)
		if err != nil {
			return nil, nil, bad("operators[%d].key (%s): %v", i, o.Name, err)
		}
		if v.Name() != o.Name {
			return nil, nil, bad("operators[%d].key is named %q, not %q", i, v.Name(), o.Name)
		}
		vs = append(vs, v)
		byKey[nameHash{v.Name(), v.KeyHash()}] = o.Name
	}
	return vs, byKey, nil
}

// keyMaterial is a verifier key without its name and hash: the key type
// and public key (base64).
func keyMaterial(vkey string) string {
	parts := strings.SplitN(vkey, "+", 3)
	return parts[len(parts)-1]
}

// ParsePolicy parses a policy in strict YAML (unknown keys are errors),
// fills MaxValidity with DefaultMaxValidity if it is left out, and
// validates it:
//
//	threshold: 2
//	max_validity: 72h
//	operators:
//	  - name: alice
//	    key: alice+1a2b3c4d+AU...
//
// Errors wrap ErrInvalidPolicy.
func ParsePolicy(b []byte) (*Policy, error) {
	if len(b) > maxPolicySize {
		return nil, fmt.Errorf("%w: over %d bytes", ErrInvalidPolicy, maxPolicySize)
	}
	var p Policy
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&p); err != nil {
		if errors.Is(err, io.EOF) {
			err = errors.New("empty")
		}
		return nil, fmt.Errorf("%w: %v", ErrInvalidPolicy, err)
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: more than one YAML document", ErrInvalidPolicy)
	}
	if p.MaxValidity == 0 {
		p.MaxValidity = DefaultMaxValidity
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// LoadPolicy reads and parses the policy file at path (see ParsePolicy).
func LoadPolicy(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("quorum: policy: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPolicySize+1))
	if err != nil {
		return nil, fmt.Errorf("quorum: policy: %w", err)
	}
	p, err := ParsePolicy(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}
