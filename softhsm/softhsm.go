// Package softhsm sets up SoftHSM2 tokens for development and tests:
// it finds the module, writes a softhsm2.conf, and initializes tokens
// through PKCS#11, so that no PIN ever appears on a command line.
//
// SoftHSM reads the SOFTHSM2_CONF environment variable once, when the module
// is initialized (C_Initialize), and a module has one state per process. So
// SOFTHSM2_CONF must point at the configuration before the first use of the
// module in the process, and every token of one process lives in one token
// directory. NewTestToken arranges this for tests.
package softhsm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
)

// modulePaths are the usual locations of libsofthsm2.so.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",                   // Debian, Ubuntu
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",  // Debian multiarch
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so", // Debian multiarch (arm64)
	"/usr/lib64/pkcs11/libsofthsm2.so",                  // Fedora, RHEL
	"/usr/lib64/softhsm/libsofthsm2.so",                 // openSUSE
	"/usr/lib/pkcs11/libsofthsm2.so",                    // Arch
	"/usr/local/lib/softhsm/libsofthsm2.so",             // built from source
	"/opt/homebrew/lib/softhsm/libsofthsm2.so",          // Homebrew (arm64)
	"/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so", // Homebrew (x86_64)
}

// ErrNotInstalled: libsofthsm2.so was not found.
var ErrNotInstalled = errors.New("softhsm: SoftHSM2 is not installed (install the Debian/Ubuntu package softhsm2, or softhsm on Fedora)")

// ErrTokenExists: InitToken found a token with the label already.
var ErrTokenExists = errors.New("softhsm: a token with this label exists")

// ModulePath returns the path of libsofthsm2.so, searched in the usual
// Debian, Ubuntu, Fedora and source-install locations. If none exists the
// error wraps ErrNotInstalled and names the Debian package softhsm2.
func ModulePath() (string, error) {
	for _, p := range modulePaths {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w; looked in %s", ErrNotInstalled, strings.Join(modulePaths, ", "))
}

// WriteConfig writes dir/softhsm2.conf for a file object store in
// dir/tokens (created 0700; the config file is 0600) and returns the
// config's path. Point SOFTHSM2_CONF at it before the module is first
// initialized in the process.
func WriteConfig(dir string) (confPath string, err error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("softhsm: %w", err)
	}
	if strings.ContainsAny(abs, "\n\r") {
		return "", errors.New("softhsm: config directory name contains a newline")
	}
	tokens := filepath.Join(abs, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return "", fmt.Errorf("softhsm: %w", err)
	}
	if err := os.Chmod(tokens, 0o700); err != nil {
		return "", fmt.Errorf("softhsm: %w", err)
	}
	conf := fmt.Sprintf(`# SoftHSM v2 configuration written by github.com/hsmd/hsmd/softhsm.
directories.tokendir = %s
objectstore.backend = file
log.level = ERROR
slots.removable = false
`, tokens)
	confPath = filepath.Join(abs, "softhsm2.conf")
	f, err := os.OpenFile(confPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", fmt.Errorf("softhsm: %w", err)
	}
	_, err = f.WriteString(conf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(confPath, 0o600)
	}
	if err != nil {
		return "", fmt.Errorf("softhsm: writing %s: %w", confPath, err)
	}
	return confPath, nil
}

// initMu serialises token creation in the process: two InitToken calls
// would otherwise pick the same free slot.
var initMu sync.Mutex

// InitToken initializes a new token labelled label in the first slot
// without a token, sets its SO PIN, logs in as SO and sets the user PIN
// (C_InitToken, C_Login(SO), C_InitPIN). It refuses (ErrTokenExists) if a
// token with that label exists. SOFTHSM2_CONF must already point at the
// configuration: the module reads it at C_Initialize. The module is shared
// with any HSM of the process (hsm.LoadModule), never finalized under it.
// Errors never contain the PINs. Safe for concurrent use.
func InitToken(modulePath, label string, soPIN, userPIN []byte) error {
	if err := checkArgs(label, soPIN, userPIN); err != nil {
		return err
	}
	initMu.Lock()
	defer initMu.Unlock()
	ctx, release, err := hsm.LoadModule(modulePath)
	if err != nil {
		return err
	}
	defer release()
	slot, err := freeSlot(ctx, label)
	if err != nil {
		return err
	}
	if err := ctx.InitToken(slot, string(soPIN), label); err != nil {
		return fmt.Errorf("softhsm: initializing token %q: %w", label, err)
	}
	// SoftHSM may renumber the slot of a freshly initialized token.
	if slot, err = slotOf(ctx, label); err != nil {
		return err
	}
	return setUserPIN(ctx, slot, label, soPIN, userPIN)
}

func checkArgs(label string, soPIN, userPIN []byte) error {
	switch {
	case label == "" || len(label) > 32:
		return errors.New("softhsm: token label must be 1 to 32 bytes")
	case hsm.HasPINValue(label):
		return errors.New("softhsm: token label must not contain pin-value=")
	case len(soPIN) < 4 || len(soPIN) > 255 || len(userPIN) < 4 || len(userPIN) > 255:
		return errors.New("softhsm: PINs must be 4 to 255 bytes")
	case os.Getenv("SOFTHSM2_CONF") == "":
		return errors.New("softhsm: SOFTHSM2_CONF is not set; point it at a config from WriteConfig")
	}
	return nil
}

// freeSlot returns the first slot without an initialized token, and fails
// if a token labelled label exists.
func freeSlot(ctx *pkcs11.Ctx, label string) (uint, error) {
	slots, err := ctx.GetSlotList(false)
	if err != nil {
		return 0, fmt.Errorf("softhsm: listing slots: %w", err)
	}
	free, found := uint(0), false
	for _, s := range slots {
		ti, err := ctx.GetTokenInfo(s)
		if err != nil {
			continue
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			if !found {
				free, found = s, true
			}
			continue
		}
		if ti.Label == label {
			return 0, fmt.Errorf("%w: %q", ErrTokenExists, label)
		}
	}
	if !found {
		return 0, errors.New("softhsm: no free slot")
	}
	return free, nil
}

func slotOf(ctx *pkcs11.Ctx, label string) (uint, error) {
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("softhsm: listing slots: %w", err)
	}
	for _, s := range slots {
		if ti, err := ctx.GetTokenInfo(s); err == nil && ti.Label == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("softhsm: token %q not found after initialization", label)
}

func setUserPIN(ctx *pkcs11.Ctx, slot uint, label string, soPIN, userPIN []byte) error {
	sh, err := ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("softhsm: opening a session on token %q: %w", label, err)
	}
	defer ctx.CloseSession(sh)
	if err := ctx.Login(sh, pkcs11.CKU_SO, string(soPIN)); err != nil {
		return fmt.Errorf("softhsm: SO login on token %q: %w", label, err)
	}
	defer ctx.Logout(sh)
	if err := ctx.InitPIN(sh, string(userPIN)); err != nil {
		return fmt.Errorf("softhsm: setting the user PIN of token %q: %w", label, err)
	}
	return nil
}
