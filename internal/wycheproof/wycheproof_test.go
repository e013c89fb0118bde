package wycheproof

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestDecodeHex(t *testing.T) {
	for in, want := range map[string][]byte{"": {}, "00ff": {0, 0xff}, "ABcd": {0xab, 0xcd}} {
		got, err := DecodeHex(in)
		if err != nil || got == nil || !bytes.Equal(got, want) {
			t.Errorf("DecodeHex(%q) = %x, %v; want %x", in, got, err, want)
		}
	}
	for _, in := range []string{"0", "zz", "0g"} {
		if _, err := DecodeHex(in); err == nil {
			t.Errorf("DecodeHex(%q) succeeded", in)
		}
	}
	if got := MustHex(t, "0102"); !bytes.Equal(got, []byte{1, 2}) {
		t.Errorf("MustHex = %x", got)
	}
}

func TestHexJSON(t *testing.T) {
	var v struct {
		A, B, C Hex
	}
	if err := json.Unmarshal([]byte(`{"A": "0a0B", "B": ""}`), &v); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(v.A, []byte{0x0a, 0x0b}) || v.B == nil || len(v.B) != 0 || v.C != nil {
		t.Errorf("decoded A=%x B=%#v C=%#v; want 0a0b, empty, nil", v.A, v.B, v.C)
	}
	for _, in := range []string{`{"A": 12}`, `{"A": "abc"}`, `{"A": "xy"}`} {
		if err := json.Unmarshal([]byte(in), &v); err == nil {
			t.Errorf("Unmarshal(%s) succeeded", in)
		}
	}
}

// loaders loads every vector file the repository keeps, each with its
// schema's group type, and returns its vector count.
var loaders = map[string]func(t *testing.T, name string) int{
	"aes_gcm_test.json":                      func(t *testing.T, n string) int { return Load[AEADGroup](t, n).NumberOfTests },
	"hmac_sha256_test.json":                  func(t *testing.T, n string) int { return Load[MACGroup](t, n).NumberOfTests },
	"hkdf_sha256_test.json":                  func(t *testing.T, n string) int { return Load[HKDFGroup](t, n).NumberOfTests },
	"ecdsa_secp256r1_sha256_test.json":       func(t *testing.T, n string) int { return Load[ECDSAGroup](t, n).NumberOfTests },
	"ecdsa_secp256r1_sha256_p1363_test.json": func(t *testing.T, n string) int { return Load[ECDSAGroup](t, n).NumberOfTests },
	"ed25519_test.json":                      func(t *testing.T, n string) int { return Load[EdDSAGroup](t, n).NumberOfTests },
	"mldsa_44_verify_test.json":              func(t *testing.T, n string) int { return Load[MLDSAVerifyGroup](t, n).NumberOfTests },
	"mlkem_768_test.json":                    func(t *testing.T, n string) int { return Load[MLKEMGroup](t, n).NumberOfTests },
}

// TestLoadAll loads every file in testdata/wycheproof (Load checks the
// vector count against the header), and fails for a file no loader knows,
// so that no unused vector file is kept, and for a missing LICENSE, SOURCE
// or README.
func TestLoadAll(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(filepath.Join(root, Dir))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	for _, want := range []string{"LICENSE", "SOURCE", "README.md"} {
		if !slices.Contains(names, want) {
			t.Errorf("%s has no %s", Dir, want)
		}
	}
	readme, err := os.ReadFile(filepath.Join(root, Dir, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		if !strings.HasSuffix(name, ".json") {
			continue
		}
		load, ok := loaders[name]
		if !ok {
			t.Errorf("%s: no loader for this file (unused vectors?)", name)
			continue
		}
		if !bytes.Contains(readme, []byte(name)) {
			t.Errorf("%s: not listed in README.md", name)
		}
		t.Run(name, func(t *testing.T) {
			if n := load(t, name); n == 0 {
				t.Error("no vectors")
			}
		})
	}
	for name := range loaders {
		if !slices.Contains(names, name) {
			t.Errorf("%s: missing from %s", name, Dir)
		}
	}
}

// TestLoadDecodesFields spot-checks decoded values against the files.
func TestLoadDecodesFields(t *testing.T) {
	gcm := Load[AEADGroup](t, "aes_gcm_test.json")
	g := gcm.Groups[0]
	if g.KeySize != 128 || g.IVSize != 96 || g.TagSize != 128 {
		t.Errorf("first AES-GCM group: key %d, iv %d, tag %d bits", g.KeySize, g.IVSize, g.TagSize)
	}
	c := g.Tests[0]
	if c.TcID != 1 || c.Result != Valid || len(c.Key) != 16 || len(c.IV) != 12 || len(c.Tag) != 16 || c.AAD == nil {
		t.Errorf("tcId 1: %v key %x iv %x tag %x aad %#v", c.Case, c.Key, c.IV, c.Tag, c.AAD)
	}
	if _, ok := gcm.Notes["ModifiedTag"]; !ok {
		t.Error("AES-GCM notes lack ModifiedTag")
	}
	kem := Load[MLKEMGroup](t, "mlkem_768_test.json")
	k := kem.Groups[0].Tests[0]
	if len(k.Seed) != 64 || len(k.EK) != 1184 || len(k.C) != 1088 || len(k.K) != 32 {
		t.Errorf("ML-KEM tcId %d: seed %d, ek %d, c %d, K %d bytes", k.TcID, len(k.Seed), len(k.EK), len(k.C), len(k.K))
	}
}

func TestDecodeRejects(t *testing.T) {
	for name, in := range map[string]string{
		"count":  `{"numberOfTests": 2, "testGroups": [{"tests": [{"tcId": 1, "result": "valid"}]}]}`,
		"result": `{"numberOfTests": 1, "testGroups": [{"tests": [{"tcId": 1, "result": "maybe"}]}]}`,
		"empty":  `{"numberOfTests": 0, "testGroups": []}`,
		"hex":    `{"numberOfTests": 1, "testGroups": [{"tests": [{"tcId": 1, "result": "valid", "msg": "x"}]}]}`,
		"json":   `{`,
	} {
		if _, err := decode[MACGroup](name, []byte(in)); err == nil {
			t.Errorf("%s: decode succeeded", name)
		}
	}
	f, err := decode[MACGroup]("ok", []byte(`{"numberOfTests": 1, "testGroups": [{"tests": [{"tcId": 7, "result": "acceptable", "tag": "01"}]}]}`))
	if err != nil || f.Groups[0].Tests[0].TcID != 7 || !bytes.Equal(f.Groups[0].Tests[0].Tag, []byte{1}) {
		t.Errorf("decode = %+v, %v", f, err)
	}
}

func TestStats(t *testing.T) {
	var s Stats
	valid, invalid, acc := Case{TcID: 1, Result: Valid}, Case{TcID: 2, Result: Invalid}, Case{TcID: 3, Result: Acceptable}
	cause := errors.New("cause")
	for _, tc := range []struct {
		c        Case
		accepted bool
		mismatch bool
	}{
		{valid, true, false}, {valid, false, true},
		{invalid, false, false}, {invalid, true, true},
		{acc, true, false}, {acc, false, false},
	} {
		err := s.Record(tc.c, tc.accepted, cause)
		if (err != nil) != tc.mismatch {
			t.Errorf("Record(%v, %v) = %v, want mismatch %v", tc.c, tc.accepted, err, tc.mismatch)
		}
		if err != nil && !strings.Contains(err.Error(), "tcId") {
			t.Errorf("Record error %q does not name the vector", err)
		}
	}
	s.Skip("too short")
	s.Skip("too short")
	if s.Total() != 6 || s.Run[Valid] != 2 || s.Run[Invalid] != 2 || s.Run[Acceptable] != 2 {
		t.Errorf("counts %v", s.Run)
	}
	want := "run 6 (valid 2, invalid 2, acceptable 2); skipped 2 (too short: 2)"
	if got := s.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	var empty Stats
	if got := empty.String(); got != "run 0 (valid 0, invalid 0, acceptable 0); skipped 0" {
		t.Errorf("empty String() = %q", got)
	}
}

func TestRepoRoot(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatal(err)
	}
	if _, ok := findUp(t.TempDir(), "no-such-file-anywhere.hsmd"); ok {
		t.Error("findUp found a file that does not exist")
	}
}
