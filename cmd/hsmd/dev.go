package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/softhsm"
)

// devProfile turns c into the development profile: a SoftHSM token under
// the data directory, made on first use, and loopback listeners. It sets
// SOFTHSM2_CONF for this process, so it must run before the HSM is opened.
//
// Until the TPM issue lands, the dev token's PINs are kept in files (0600)
// under <data_dir>/softhsm; production configs name their own PIN source.
func devProfile(c *Config, logf func(string, ...any)) error {
	if c.Listen.TCP == "" {
		c.Listen.TCP = DefaultTCPAddr
	}
	if c.Listen.Metrics == "" {
		c.Listen.Metrics = DefaultMetricsAddr
	}
	dir := filepath.Join(c.DataDir, "softhsm")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dev profile: %w", err)
	}
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		return err
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return err
	}
	module, err := softhsm.ModulePath()
	if err != nil {
		return withHint(err, "install it: sudo apt-get install -y softhsm2 (make run does this when run as root)")
	}
	pinFile := filepath.Join(dir, "user.pin")
	c.HSM = hsm.Config{Module: module, TokenLabel: DevTokenLabel, PINFile: pinFile,
		Sessions: c.HSM.Sessions, CallTimeout: c.HSM.CallTimeout}
	if _, err := os.Stat(pinFile); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("dev profile: %w", err)
	}
	logf("creating the development SoftHSM token %q under %s", DevTokenLabel, dir)
	return newDevToken(module, dir, pinFile)
}

// newDevToken makes a token with random PINs. The PIN files are written
// first (so a token never exists without its PIN) and removed if the token
// cannot be made.
func newDevToken(module, dir, pinFile string) error {
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
