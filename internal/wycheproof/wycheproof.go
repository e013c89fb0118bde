// Package wycheproof loads the Wycheproof test vectors kept in the
// repository's testdata/wycheproof directory (C2SP/wycheproof, Apache
// License 2.0; see the LICENSE, SOURCE and README files there) for the
// known-answer tests of the primitives hsmd wraps.
//
// Load decodes one vector file into the group type of its schema (AEADGroup,
// MACGroup, HKDFGroup, ECDSAGroup, EdDSAGroup, MLDSAVerifyGroup,
// MLKEMGroup); hex fields decode into Hex while the file is read. Stats
// compares each vector's outcome with its expected result and counts the
// vectors run and skipped, so that a test can report and assert its counts.
//
// It is for tests only; nothing in it is safe for concurrent use.
package wycheproof

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// Dir is the vector directory, relative to the repository root.
const Dir = "testdata/wycheproof"

// Result is a vector's expected result.
type Result string

// The results a vector can expect. An acceptable vector may pass or fail
// (the file's notes explain why: for example a legacy encoding).
const (
	Valid      Result = "valid"
	Invalid    Result = "invalid"
	Acceptable Result = "acceptable"
)

// File is one vector file: its header, notes and groups of type G.
type File[G any] struct {
	Algorithm     string          `json:"algorithm"`
	Schema        string          `json:"schema"`
	NumberOfTests int             `json:"numberOfTests"`
	Notes         map[string]Note `json:"notes"`
	Groups        []G             `json:"testGroups"`
}

// Note explains a flag that vectors carry.
type Note struct {
	BugType     string `json:"bugType"`
	Description string `json:"description"`
}

// Case holds what every vector has besides its inputs.
type Case struct {
	TcID    int      `json:"tcId"`
	Comment string   `json:"comment"`
	Flags   []string `json:"flags"`
	Result  Result   `json:"result"`
}

// String names the case in failure messages: tcId, comment and flags.
func (c Case) String() string {
	return fmt.Sprintf("tcId %d (%s) %q %v", c.TcID, c.Result, c.Comment, c.Flags)
}

// Hex is bytes written in JSON as a hex string. An empty string decodes
// to an empty, non-nil slice; a missing field stays nil.
type Hex []byte

// UnmarshalJSON decodes a JSON hex string.
func (h *Hex) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("wycheproof: hex field: %w", err)
	}
	d, err := DecodeHex(s)
	if err != nil {
		return err
	}
	*h = d
	return nil
}

// DecodeHex decodes the hex string s (either case), returning an empty,
// non-nil slice for "".
func DecodeHex(s string) ([]byte, error) {
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("wycheproof: hex field: %w", err)
	}
	if b == nil {
		b = []byte{}
	}
	return b, nil
}

// MustHex is DecodeHex for constants in tests: it fails t on bad input.
func MustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := DecodeHex(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Load reads and decodes the vector file name (such as
// "aes_gcm_test.json") from the repository's testdata/wycheproof. It fails
// t if the file cannot be found or decoded, if it holds no group, or if
// its numberOfTests does not match the vectors decoded (a truncated or
// edited copy).
func Load[G Group](t testing.TB, name string) *File[G] {
	t.Helper()
	f, err := load[G](name)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func load[G Group](name string) (*File[G], error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(root, Dir, name))
	if err != nil {
		return nil, fmt.Errorf("wycheproof: %w", err)
	}
	return decode[G](name, b)
}

// decode parses a vector file and checks its vector count and results.
func decode[G Group](name string, b []byte) (*File[G], error) {
	var f File[G]
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("wycheproof: %s: %w", name, err)
	}
	if len(f.Groups) == 0 {
		return nil, fmt.Errorf("wycheproof: %s: no test groups", name)
	}
	n := 0
	for _, g := range f.Groups {
		for _, c := range g.cases() {
			switch c.Result {
			case Valid, Invalid, Acceptable:
			default:
				return nil, fmt.Errorf("wycheproof: %s: tcId %d: unknown result %q", name, c.TcID, c.Result)
			}
			n++
		}
	}
	if n != f.NumberOfTests {
		return nil, fmt.Errorf("wycheproof: %s: %d vectors decoded, the header says %d", name, n, f.NumberOfTests)
	}
	return &f, nil
}

// RepoRoot returns the repository root: the nearest directory holding
// go.mod above the working directory (a package directory under go test),
// or else above this source file.
func RepoRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		if root, ok := findUp(dir, "go.mod"); ok {
			return root, nil
		}
	}
	return "", errors.New("wycheproof: no go.mod above the working directory or this package")
}

// findUp returns the first directory from dir upwards that holds name.
func findUp(dir, name string) (string, bool) {
	for {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return dir, true
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", false
		}
		dir = parent
	}
}
