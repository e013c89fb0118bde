package softhsm_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hsmd/hsmd/softhsm"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

func TestModulePath(t *testing.T) {
	p, err := softhsm.ModulePath()
	if err != nil {
		t.Fatalf("ModulePath: %v (SoftHSM2 is required; no test skips)", err)
	}
	if !strings.HasSuffix(p, "libsofthsm2.so") {
		t.Fatalf("ModulePath = %s", p)
	}
}

func TestWriteConfig(t *testing.T) {
	dir := t.TempDir()
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"directories.tokendir = " + filepath.Join(dir, "tokens") + "\n",
		"objectstore.backend = file\n", "log.level = ERROR\n", "slots.removable = false\n",
	} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("config lacks %q:\n%s", want, b)
		}
	}
	for path, mode := range map[string]os.FileMode{conf: 0o600, filepath.Join(dir, "tokens"): 0o700} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
}

func TestNewTestTokenAndInitToken(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	if tok.Label == "" || len(tok.UserPIN) == 0 {
		t.Fatalf("token %+v", tok)
	}
	fi, err := os.Stat(tok.PINFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("PIN file: %v, %v", fi, err)
	}
	b, _ := os.ReadFile(tok.PINFile)
	if !bytes.Equal(bytes.TrimSuffix(b, []byte("\n")), tok.UserPIN) {
		t.Fatal("PIN file does not hold the user PIN")
	}
	other := softhsm.NewTestToken(t)
	if other.Label == tok.Label {
		t.Fatal("two test tokens share a label")
	}
	so, user := []byte("so-pin-123456"), []byte("user-pin-123456")
	err = softhsm.InitToken(tok.Module, tok.Label, so, user)
	if !errors.Is(err, softhsm.ErrTokenExists) {
		t.Fatalf("InitToken(existing label) = %v, want ErrTokenExists", err)
	}
	if strings.Contains(err.Error(), string(so)) || strings.Contains(err.Error(), string(user)) {
		t.Fatalf("error reveals a PIN: %v", err)
	}
	if err := softhsm.InitToken(tok.Module, "x", []byte("1"), user); err == nil {
		t.Fatal("InitToken accepted a 1-byte SO PIN")
	}
}

func TestParallelTokens(t *testing.T) {
	for i := range 4 {
		t.Run(string(rune('a'+i)), func(t *testing.T) {
			t.Parallel()
			softhsm.NewTestToken(t)
		})
	}
}
