package ceremony

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"filippo.io/age"
	"gopkg.in/yaml.v3"
)

// fileOut is File's YAML as a ceremony file spells it: fields left out
// when unused (File's own tags would write them as null or []).
type fileOut struct {
	Ceremony   string       `yaml:"ceremony,omitempty"`
	ID         string       `yaml:"id,omitempty"`
	Version    uint32       `yaml:"version,omitempty"`
	Key        string       `yaml:"key,omitempty"`
	Custody    *Custody     `yaml:"custody,omitempty"`
	Shares     []ShareInput `yaml:"shares,omitempty"`
	Expect     string       `yaml:"expect,omitempty"`
	Approvals  string       `yaml:"approvals,omitempty"`
	Transcript string       `yaml:"transcript,omitempty"`
}

func (f *File) out() fileOut {
	return fileOut{f.Ceremony, f.ID, f.Version, f.Key, f.Custody, f.Shares, f.Expect, f.Approvals, f.Transcript}
}

// ceremonySeeds are realistic ceremony files of every kind and broken
// ones; dir holds the files a restore reads.
func ceremonySeeds(f *testing.F, dir string) []string {
	f.Helper()
	x, err := age.GenerateX25519Identity()
	if err != nil {
		f.Fatal(err)
	}
	h, err := age.GenerateHybridIdentity()
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range []string{"init.transcript", "alice.share", "bob.share"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(name), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	custody := fmt.Sprintf("custody:\n  threshold: 2\n  custodians:\n"+
		"    - {name: alice, recipient: %s, output: alice.share}\n"+
		"    - {name: bob, recipient: %s, output: bob.share}\n", x.Recipient(), h.Recipient())
	return []string{
		"ceremony: root-init\nid: init-2026\ntranscript: init.transcript\n" + custody,
		"ceremony: root-init\nid: plain\ntranscript: t\n",
		"ceremony: rotate-kdk\nid: kdk2\nversion: 2\napprovals: kdk2.approval\ntranscript: kdk2.transcript\n" + custody,
		"ceremony: restore\nid: rs\nexpect: init.transcript\napprovals: rs.approval\ntranscript: rs.transcript\nshares:\n" +
			"  - {file: alice.share, identity: alice.key}\n  - {file: bob.share, identity: bob.key}\n",
		"ceremony: rotate-signing\nid: sig2\nversion: 2\ntranscript: sig2.transcript\n",
		"ceremony: destroy-root\nid: d1\nkey: kdk\nversion: 1\napprovals: d1.approval\ntranscript: d1.transcript\n",
		"ceremony: destroy-root\nid: d1\nkey: wrap\nversion: 1\napprovals: a\ntranscript: t\n",
		"ceremony: root-init\nid: x\ntranscript: t\ntranscript: u\n",          // repeated key
		"ceremony: root-init\nid: x\ntranscript: t\ncolour: blue\n",           // unknown key
		"ceremony: root-init\nid: &a x\ntranscript: *a\n",                     // alias
		"ceremony: root-init\nid: x\ntranscript: t\n---\nceremony: restore\n", // two documents
		"ceremony: restore\nid: rs\nexpect: missing\napprovals: a\ntranscript: t\nshares: [{file: gone, identity: k}]\n",
		"ceremony: root-init\nid: x\ntranscript: t\nversion: -1\n",
		"ceremony: root-init\nid: \"\"\n", "", "[]", "ceremony: [a]\n", "id: x\n",
	}
}

// FuzzParse: Parse never panics, its errors are a *PathError or the
// prefixed YAML error, and an accepted file written out again (as an
// operator would) parses to the same ceremony. Load refuses a file over
// MaxFileSize before reading it.
func FuzzParse(f *testing.F) {
	dir := f.TempDir()
	seeds := ceremonySeeds(f, dir)
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for i, s := range seeds {
		f.Add([]byte(s))
		if _, err := Parse([]byte(s), dir); i < 6 && err != nil {
			f.Fatalf("valid seed %d is refused: %v", i, err)
		}
	}
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, append([]byte(seeds[1]+"#"), bytes.Repeat([]byte("x"), MaxFileSize)...), 0o600); err != nil {
		f.Fatal(err)
	}
	if _, err := Load(big); err == nil || !strings.Contains(err.Error(), "over") {
		f.Fatalf("Load of a file over MaxFileSize: %v", err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b, dir)
		if err != nil {
			var pe *PathError
			if !errors.As(err, &pe) && !strings.HasPrefix(err.Error(), "ceremony file: ") {
				t.Fatalf("error %v is neither a PathError nor prefixed", err)
			}
			return
		}
		out, err := yaml.Marshal(c.out())
		if err != nil {
			t.Fatalf("an accepted file does not marshal: %v", err)
		}
		c2, err := Parse(out, dir)
		if err != nil {
			t.Fatalf("an accepted file written out again is refused: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(c.out(), c2.out()) || !reflect.DeepEqual(c.Outputs(), c2.Outputs()) || !bytes.Equal(c.inputs, c2.inputs) {
			t.Fatalf("round trip changed the ceremony:\n%+v\n%+v", c.out(), c2.out())
		}
	})
}
