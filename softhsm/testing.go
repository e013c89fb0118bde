package softhsm

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// TestToken is a fresh SoftHSM token made by NewTestToken.
type TestToken struct {
	Module  string // path to libsofthsm2.so
	Label   string // token label, unique in the process
	PINFile string // 0600 file holding the user PIN and a newline
	UserPIN []byte // the user PIN, for tests that need it (e.g. to check it never leaks)
}

var testEnv struct {
	once   sync.Once
	dir    string
	module string
	err    error
}

// setupTestEnv once per process makes a token directory under os.TempDir,
// writes its config and sets SOFTHSM2_CONF. The directory outlives single
// tests (SoftHSM keeps it open for the whole process); RunTests removes it.
func setupTestEnv() (module string, err error) {
	testEnv.once.Do(func() {
		if testEnv.module, testEnv.err = ModulePath(); testEnv.err != nil {
			return
		}
		if testEnv.dir, testEnv.err = os.MkdirTemp("", "hsmd-softhsm-"); testEnv.err != nil {
			return
		}
		var conf string
		if conf, testEnv.err = WriteConfig(testEnv.dir); testEnv.err != nil {
			return
		}
		testEnv.err = os.Setenv("SOFTHSM2_CONF", conf)
	})
	return testEnv.module, testEnv.err
}

// NewTestToken initializes a new SoftHSM token with a unique label and
// random SO and user PINs, writes the user PIN to a 0600 file in t.TempDir,
// and returns it. On first use in the process it sets SOFTHSM2_CONF to a
// private configuration (so it must run before anything else in the process
// initializes SoftHSM). If SoftHSM2 is missing the test fails (never skips)
// and says to install the Debian package softhsm2. Safe for parallel tests.
func NewTestToken(t testing.TB) TestToken {
	t.Helper()
	module, err := setupTestEnv()
	if err != nil {
		t.Fatalf("SoftHSM2 is required by this test (no test skips it): %v", err)
	}
	label := "hsmd-test-" + randomHex(t, 8)
	soPIN := []byte(randomHex(t, 16))
	userPIN := []byte(randomHex(t, 16))
	if err := InitToken(module, label, soPIN, userPIN); err != nil {
		t.Fatalf("creating SoftHSM test token: %v", err)
	}
	clear(soPIN)
	pinFile := filepath.Join(t.TempDir(), "user.pin")
	if err := os.WriteFile(pinFile, append(append([]byte{}, userPIN...), '\n'), 0o600); err != nil {
		t.Fatalf("writing PIN file: %v", err)
	}
	return TestToken{Module: module, Label: label, PINFile: pinFile, UserPIN: userPIN}
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("crypto/rand: %v", err)
	}
	return hex.EncodeToString(b)
}

// RunTests runs m and then removes the token directory NewTestToken made.
// Use it from TestMain: func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }.
// All HSMs must be closed by then (t.Cleanup does this).
func RunTests(m *testing.M) int {
	code := m.Run()
	if testEnv.dir != "" {
		if err := os.RemoveAll(testEnv.dir); err != nil {
			fmt.Fprintf(os.Stderr, "softhsm: removing %s: %v\n", testEnv.dir, err)
		}
	}
	return code
}
