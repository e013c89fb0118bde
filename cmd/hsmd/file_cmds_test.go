package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestFileEncryptDecrypt drives `hsmd encrypt --file` and `hsmd decrypt
// --file` against `hsmd serve --dev`: a multi-chunk file round trip, files
// and stdin/stdout, and refusals that leave no output file behind.
func TestFileEncryptDecrypt(t *testing.T) {
	dir := t.TempDir()
	startDaemon(t, serveCmd(t, dir))
	mustCLI(t, dir, "", "tenants", "create", "demo")
	mustCLI(t, dir, "", "tenants", "create", "other")

	pt := make([]byte, 5*65536+1234) // six chunks of the default size
	rand.Read(pt)
	fileWrite(t, dir, "in.bin", pt)
	mustCLI(t, dir, "", "encrypt", "--tenant", "demo", "--context", "app=files", "--file", "in.bin", "--out", "in.bin.hsmd")
	ct := fileRead(t, dir, "in.bin.hsmd")
	if !bytes.HasPrefix(ct, []byte("\x89HSMD\r\n\x1a\x01")) {
		t.Fatalf("encrypted file starts % x", ct[:min(len(ct), 9)])
	}
	if want := 22 + 90 + len(pt) + 6*16; len(ct) != want {
		t.Fatalf("encrypted file is %d bytes, want %d", len(ct), want)
	}
	mustCLI(t, dir, "", "decrypt", "--context", "app=files", "--file", "in.bin.hsmd", "--out", "back.bin")
	if !bytes.Equal(fileRead(t, dir, "back.bin"), pt) {
		t.Fatal("decrypted file differs")
	}
	if fi, err := os.Stat(filepath.Join(dir, "back.bin")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("decrypted file: %v, %v; want mode 0600", fi.Mode(), err)
	}

	// stdin and stdout, with - and without --out, and the expected tenant.
	ct2 := mustCLI(t, dir, string(pt), "encrypt", "--tenant", "demo", "--file", "-", "--out", "-")
	if out := mustCLI(t, dir, ct2, "decrypt", "--tenant", "demo", "--file", "-"); out != string(pt) {
		t.Fatal("stdin to stdout: decrypted bytes differ")
	}

	// A tampered chunk, a truncated file, the wrong context or tenant: the
	// one error, and no output file, neither new nor a replaced old one.
	fileWrite(t, dir, "keep.bin", []byte("old"))
	tampered := bytes.Clone(ct)
	tampered[22+90+3*(65536+16)+100] ^= 1
	fileWrite(t, dir, "tampered.hsmd", tampered)
	fileWrite(t, dir, "truncated.hsmd", ct[:len(ct)-(1234+16)])
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"tampered", []string{"--context", "app=files", "--file", "tampered.hsmd"}},
		{"truncated", []string{"--context", "app=files", "--file", "truncated.hsmd"}},
		{"wrong context", []string{"--context", "app=other", "--file", "in.bin.hsmd"}},
		{"wrong tenant", []string{"--tenant", "other", "--context", "app=files", "--file", "in.bin.hsmd"}},
	} {
		for _, out := range []string{"new.bin", "keep.bin"} {
			args := append([]string{"decrypt", "--out", out}, tc.args...)
			_, errOut, err := cli(t, dir, "", args...)
			if fileExitCode(err) != 1 || strings.TrimSpace(errOut) != "hsmd: error: decryption failed" {
				t.Errorf("%s --out %s: %v %q", tc.name, out, err, errOut)
			}
		}
		if _, err := os.Stat(filepath.Join(dir, "new.bin")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: the output file exists: %v", tc.name, err)
		}
		if got := fileRead(t, dir, "keep.bin"); string(got) != "old" {
			t.Errorf("%s: the existing output file was replaced", tc.name)
		}
	}
	// Without --out the plaintext streams, and the failure says it is
	// incomplete.
	out, errOut, err := cli(t, dir, "", "decrypt", "--context", "app=files", "--file", "tampered.hsmd")
	if fileExitCode(err) != 1 || !strings.Contains(errOut, "hsmd: error: decryption failed") || !strings.Contains(errOut, "incomplete") {
		t.Errorf("tampered to stdout: %v %q", err, errOut)
	}
	if out != string(pt[:3*65536]) {
		t.Errorf("tampered to stdout: %d bytes out, want the 3 chunks before the damage", len(out))
	}
	// Not a stream file: a record from plain `hsmd encrypt`.
	fileWrite(t, dir, "record.bin", []byte(mustCLI(t, dir, "hello", "encrypt", "--tenant", "demo")))
	if _, errOut, err := cli(t, dir, "", "decrypt", "--file", "record.bin", "--out", "x.bin"); fileExitCode(err) != 1 || !strings.Contains(errOut, "not an hsmd encrypted file") {
		t.Errorf("a record: %v %q", err, errOut)
	}
	// Usage errors.
	for _, args := range [][]string{
		{"encrypt", "--tenant", "demo", "--file", "in.bin", "--text"},
		{"encrypt", "--tenant", "demo", "--out", "x.bin"},
		{"decrypt", "--out", "x.bin"},
	} {
		if _, errOut, err := cli(t, dir, "", args...); fileExitCode(err) != 2 {
			t.Errorf("%v: %v %q, want exit status 2", args, err, errOut)
		}
	}

	// Nothing but the expected files is left: no temporary files.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	want := []string{"back.bin", "in.bin", "in.bin.hsmd", "keep.bin", "record.bin", "tampered.hsmd", "truncated.hsmd", "var"}
	if !slices.Equal(names, want) {
		t.Errorf("files left: %v, want %v", names, want)
	}
}

func fileExitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}

func fileWrite(t *testing.T, dir, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func fileRead(t *testing.T, dir, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
