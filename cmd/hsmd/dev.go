package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/softhsm"
	"github.com/hsmd/hsmd/tpm"
)

// devSetup is what the dev profile made on this start.
type devSetup struct {
	// newPIN is the user PIN of a token made (or found in a legacy PIN
	// file) on this start, to be sealed to the TPM; nil otherwise.
	newPIN []byte
	// legacy are PIN files to remove once the PIN is sealed.
	legacy []string
}

// devProfile turns c into the development profile: a SoftHSM token under
// the data directory, made on first use; the in-process TPM simulator
// (unless insecure); loopback listeners, TCP with mutual TLS under a local
// CA (see devTLS). It sets SOFTHSM2_CONF for this process, so it must run
// before the HSM is opened.
//
// With a TPM no PIN is ever written to disk: a new token's user PIN is
// returned for sealing, its SO PIN is discarded (a dev token needs none).
// With --insecure-no-tpm the PINs are kept in 0600 files under
// <data_dir>/softhsm, as a dev-only convenience. Audit checkpoints are
// published every second (so a stop, which waits for the final one, is
// quick).
func devProfile(c *Config, insecure bool, logf func(string, ...any)) (devSetup, error) {
	if c.Listen.TCP == "" {
		c.Listen.TCP = DefaultTCPAddr
	}
	if c.Audit.CheckpointInterval == 0 {
		c.Audit.CheckpointInterval = time.Second
	}
	if c.Listen.Metrics == "" {
		c.Listen.Metrics = DefaultMetricsAddr
	}
	if err := devTLS(c, time.Now(), logf); err != nil {
		return devSetup{}, err
	}
	dir := filepath.Join(c.DataDir, "softhsm")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return devSetup{}, fmt.Errorf("dev profile: %w", err)
	}
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		return devSetup{}, err
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return devSetup{}, err
	}
	module, err := softhsm.ModulePath()
	if err != nil {
		return devSetup{}, withHint(err, "install it: sudo apt-get install -y softhsm2 (make run does this when run as root)")
	}
	c.HSM = hsm.Config{Module: module, TokenLabel: DevTokenLabel, Sessions: c.HSM.Sessions, CallTimeout: c.HSM.CallTimeout,
		RecoveryHoldDown: c.HSM.RecoveryHoldDown, RecoveryMaxBackoff: c.HSM.RecoveryMaxBackoff}
	if insecure {
		return devSetup{}, devInsecureToken(c, module, dir, logf)
	}
	if c.TPM.Provider == "" {
		if c.TPM, err = devSimulator(c.DataDir); err != nil {
			return devSetup{}, err
		}
	}
	return devSealedToken(c, module, dir, logf)
}

// devSealedToken finds or makes the dev token when its PIN is sealed.
func devSealedToken(c *Config, module, dir string, logf func(string, ...any)) (devSetup, error) {
	if exists(filepath.Join(c.DataDir, localstate.SealedFile)) {
		return devSetup{}, nil // the PIN comes from the TPM
	}
	userFile := filepath.Join(dir, "user.pin")
	if exists(userFile) { // a data dir from before the TPM, or from --insecure-no-tpm
		pin, err := os.ReadFile(userFile)
		if err != nil {
			return devSetup{}, err
		}
		logf("sealing the development token's PIN to the TPM; the PIN files will be removed")
		return devSetup{newPIN: []byte(trimNewline(string(pin))), legacy: []string{userFile, filepath.Join(dir, "so.pin")}}, nil
	}
	logf("creating the development SoftHSM token %q under %s", DevTokenLabel, dir)
	so, user := randomPIN(), randomPIN()
	defer clear(so)
	if err := softhsm.InitToken(module, DevTokenLabel, so, user); err != nil {
		return devSetup{}, err
	}
	return devSetup{newPIN: user}, nil
}

// devInsecureToken finds or makes the dev token with its PINs in files.
func devInsecureToken(c *Config, module, dir string, logf func(string, ...any)) error {
	pinFile := filepath.Join(dir, "user.pin")
	c.HSM.PINFile = pinFile
	if exists(pinFile) {
		return nil
	}
	if exists(filepath.Join(c.DataDir, localstate.SealedFile)) {
		return errors.New("dev profile: this data directory's PIN is sealed to a TPM; run without --insecure-no-tpm")
	}
	logf("creating the development SoftHSM token %q under %s", DevTokenLabel, dir)
	return newInsecureDevToken(module, dir, pinFile)
}

// devSimulator is the dev profile's TPM: the in-process simulator, with a
// hierarchy seed kept in the data directory so that sealed blobs open
// again after a restart (the simulator is a development stand-in, not a
// security boundary).
func devSimulator(dataDir string) (tpm.Config, error) {
	path := filepath.Join(dataDir, "tpm", "simulator.seed")
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		b = make([]byte, 8)
		rand.Read(b)
		if err = os.MkdirAll(filepath.Dir(path), 0o700); err == nil {
			err = fsutil.WriteFileAtomic(path, b, 0o600)
		}
	}
	if err != nil {
		return tpm.Config{}, fmt.Errorf("dev profile: simulator seed: %w", err)
	}
	if len(b) != 8 {
		return tpm.Config{}, fmt.Errorf("dev profile: %s is not 8 bytes", path)
	}
	return tpm.Config{Provider: tpm.ProviderSimulator, SimulatorSeed: int64(binary.BigEndian.Uint64(b))}, nil
}

// newInsecureDevToken makes a token with random PINs kept in files. The
// PIN files are written first (so a token never exists without its PIN)
// and removed if the token cannot be made.
func newInsecureDevToken(module, dir, pinFile string) error {
	soFile := filepath.Join(dir, "so.pin")
	so, user := randomPIN(), randomPIN()
	defer clear(so)
	defer clear(user)
	for _, f := range []struct {
		path string
		pin  []byte
	}{{soFile, so}, {pinFile, user}} {
		line := make([]byte, len(f.pin)+1)
		copy(line, f.pin)
		line[len(f.pin)] = '\n'
		err := fsutil.WriteFileAtomic(f.path, line, 0o600)
		clear(line)
		if err != nil {
			return fmt.Errorf("dev profile: %w", err)
		}
	}
	if err := softhsm.InitToken(module, DevTokenLabel, so, user); err != nil {
		os.Remove(pinFile)
		os.Remove(soFile)
		return err
	}
	return nil
}

func randomPIN() []byte {
	var b [16]byte
	rand.Read(b[:])
	return []byte(hex.EncodeToString(b[:]))
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func trimNewline(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	return s
}
