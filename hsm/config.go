package hsm

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"
)

// Defaults applied by Open when the Config leaves a field zero.
const (
	DefaultSessions    = 4
	DefaultCallTimeout = 5 * time.Second
	// MaxSessions bounds Config.Sessions.
	MaxSessions = 256
	// MaxPINSize bounds the PIN source; a longer PIN file is refused.
	MaxPINSize = 256
	// DefaultRecoveryHoldDown is how long the HSM waits after a
	// recoverable fatal error before its first recovery attempt, and the
	// first delay between attempts; MinRecoveryHoldDown bounds
	// Config.RecoveryHoldDown from below.
	DefaultRecoveryHoldDown = time.Second
	MinRecoveryHoldDown     = time.Second
	// DefaultRecoveryMaxBackoff caps the delay between recovery attempts,
	// which doubles after each failed one.
	DefaultRecoveryMaxBackoff = 30 * time.Second
)

// Config says which token to use and how. It holds where the PIN is, never
// the PIN itself, so it may be logged; String prints no secret.
type Config struct {
	Module     string `yaml:"module" json:"module"`           // path to the PKCS#11 module (.so)
	TokenLabel string `yaml:"token_label" json:"token_label"` // CKA_LABEL of the token
	PINFile    string `yaml:"pin_file" json:"pin_file"`       // file holding the user PIN; one trailing newline (\n or \r\n) is trimmed; at most MaxPINSize bytes
	PINFD      int    `yaml:"pin_fd" json:"pin_fd"`           // or a file descriptor (> 0) to read the PIN from until EOF, then closed; 0 or negative = unused (so stdin cannot be used)
	// PINSource, if set, supplies the PIN instead of a file or descriptor:
	// the daemon unseals it from the TPM. It returns a fresh copy that the
	// HSM clears after use; it may be called again to log in again.
	PINSource   func() ([]byte, error) `yaml:"-" json:"-"`
	Sessions    int                    `yaml:"sessions" json:"sessions"`         // session pool size; 0 = DefaultSessions
	CallTimeout time.Duration          `yaml:"call_timeout" json:"call_timeout"` // deadline for one HSM operation and for waiting on the pool; 0 = DefaultCallTimeout
	// RecoveryHoldDown is the wait after a recoverable fatal error before
	// the first recovery attempt, and the first delay between attempts;
	// 0 = DefaultRecoveryHoldDown, otherwise at least MinRecoveryHoldDown.
	RecoveryHoldDown time.Duration `yaml:"recovery_hold_down" json:"recovery_hold_down"`
	// RecoveryMaxBackoff caps the delay between recovery attempts, which
	// doubles after each failure; 0 = DefaultRecoveryMaxBackoff, otherwise
	// at least the hold-down.
	RecoveryMaxBackoff time.Duration `yaml:"recovery_max_backoff" json:"recovery_max_backoff"`
	// Logger receives the HSM's own events (the token going unusable,
	// recovery attempts and their outcome), never a PIN; nil means
	// slog.Default().
	Logger *slog.Logger `yaml:"-" json:"-"`

	// testHoldDown and testMaxBackoff, if set (by tests only), replace the
	// recovery timings without their lower bounds.
	testHoldDown, testMaxBackoff time.Duration
}

// Validate checks c and names the offending field in its error (for
// example "hsm.module is required"). Exactly one of PINFile and PINFD must
// be set. The error wraps ErrInvalidConfig.
func (c Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, a...))
	}
	switch {
	case c.Module == "":
		return bad("hsm.module is required")
	case HasPINValue(c.Module):
		return bad("hsm.module must not contain pin-value=; use hsm.pin_file or hsm.pin_fd")
	case c.TokenLabel == "":
		return bad("hsm.token_label is required")
	case HasPINValue(c.TokenLabel):
		return bad("hsm.token_label must not contain pin-value=; use hsm.pin_file or hsm.pin_fd")
	case len(c.TokenLabel) > 32:
		return bad("hsm.token_label is longer than 32 bytes")
	case c.PINSource != nil && (c.PINFile != "" || c.PINFD > 0):
		return bad("the PIN is sealed in the TPM: remove hsm.pin_file and hsm.pin_fd")
	case c.PINSource == nil && c.PINFile == "" && c.PINFD <= 0:
		return bad("hsm.pin_file or hsm.pin_fd is required")
	case c.PINFile != "" && c.PINFD > 0:
		return bad("hsm.pin_file and hsm.pin_fd are mutually exclusive")
	case c.Sessions < 0 || c.Sessions > MaxSessions:
		return bad("hsm.sessions must be between 1 and %d (0 = default %d)", MaxSessions, DefaultSessions)
	case c.CallTimeout < 0:
		return bad("hsm.call_timeout must not be negative")
	case c.RecoveryHoldDown != 0 && c.RecoveryHoldDown < MinRecoveryHoldDown:
		return bad("hsm.recovery_hold_down must be at least %s (0 = default %s)", MinRecoveryHoldDown, DefaultRecoveryHoldDown)
	case c.RecoveryMaxBackoff < 0 || (c.RecoveryMaxBackoff != 0 && c.RecoveryMaxBackoff < max(c.RecoveryHoldDown, DefaultRecoveryHoldDown)):
		return bad("hsm.recovery_max_backoff must be at least hsm.recovery_hold_down (0 = default %s)", DefaultRecoveryMaxBackoff)
	}
	return nil
}

// HasPINValue reports whether s holds RFC 7512's PIN attribute, which
// hsmd refuses anywhere a PIN could be exposed (module paths, labels).
func HasPINValue(s string) bool {
	return strings.Contains(strings.ToLower(s), "pin-value=")
}

// withDefaults returns c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Sessions == 0 {
		c.Sessions = DefaultSessions
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = DefaultCallTimeout
	}
	if c.RecoveryHoldDown == 0 {
		c.RecoveryHoldDown = DefaultRecoveryHoldDown
	}
	if c.RecoveryMaxBackoff == 0 {
		c.RecoveryMaxBackoff = max(DefaultRecoveryMaxBackoff, c.RecoveryHoldDown)
	}
	if c.testHoldDown > 0 {
		c.RecoveryHoldDown, c.RecoveryMaxBackoff = c.testHoldDown, max(c.testMaxBackoff, c.testHoldDown)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// String describes c without any secret (the PIN source is named, never
// read).
func (c Config) String() string {
	pin := "none"
	switch {
	case c.PINSource != nil:
		pin = "sealed"
	case c.PINFile != "":
		pin = "file:" + c.PINFile
	case c.PINFD > 0:
		pin = fmt.Sprintf("fd:%d", c.PINFD)
	}
	return fmt.Sprintf("hsm.Config{module=%q token=%q pin=%s sessions=%d call_timeout=%s recovery_hold_down=%s recovery_max_backoff=%s}",
		c.Module, c.TokenLabel, pin, c.Sessions, c.CallTimeout, c.RecoveryHoldDown, c.RecoveryMaxBackoff)
}

// GoString is String, so that %#v prints no more than %v.
func (c Config) GoString() string { return c.String() }

// ReadPIN reads the PIN from the configured source, for `hsmd init` to seal
// it. The caller must clear the returned slice after use. Errors name the
// source, never the content.
func (c Config) ReadPIN() ([]byte, error) { return c.readPIN() }

// readPIN reads the PIN from the configured source. The caller must clear
// the returned slice after use. Errors name the source, never the content.
func (c Config) readPIN() ([]byte, error) {
	if c.PINSource != nil {
		pin, err := c.PINSource()
		if err != nil {
			return nil, fmt.Errorf("%w: unsealing the PIN: %w", ErrLogin, err)
		}
		return pin, nil
	}
	var (
		f   *os.File
		src string
	)
	if c.PINFile != "" {
		src = "hsm.pin_file " + c.PINFile
		var err error
		if f, err = os.Open(c.PINFile); err != nil {
			return nil, fmt.Errorf("%w: reading %s: %w", ErrLogin, src, err)
		}
	} else {
		src = fmt.Sprintf("hsm.pin_fd %d", c.PINFD)
		f = os.NewFile(uintptr(c.PINFD), "pin-fd")
		if f == nil {
			return nil, fmt.Errorf("%w: %s is not a valid descriptor", ErrLogin, src)
		}
	}
	defer f.Close()
	buf := make([]byte, MaxPINSize+1)
	n, err := io.ReadFull(f, buf)
	if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
		clear(buf)
		return nil, fmt.Errorf("%w: reading %s: %w", ErrLogin, src, err)
	}
	if n > MaxPINSize {
		clear(buf)
		return nil, fmt.Errorf("%w: %s holds more than %d bytes", ErrLogin, src, MaxPINSize)
	}
	pin := bytes.TrimSuffix(buf[:n], []byte("\n"))
	pin = bytes.TrimSuffix(pin, []byte("\r"))
	if len(pin) == 0 {
		clear(buf)
		return nil, fmt.Errorf("%w: %s is empty", ErrLogin, src)
	}
	return pin, nil
}
