package hsm_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

func TestWrongPIN(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	wrong := "wrong-pin-0123456789"
	cfg := testConfig(tok)
	cfg.PINFile = filepath.Join(t.TempDir(), "wrong.pin")
	if err := os.WriteFile(cfg.PINFile, []byte(wrong+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h, err := hsm.Open(context.Background(), cfg)
	if err == nil {
		h.Close()
		t.Fatal("Open with a wrong PIN succeeded")
	}
	if !errors.Is(err, hsm.ErrLogin) {
		t.Fatalf("Open with a wrong PIN = %v, want ErrLogin", err)
	}
	msg := fmt.Sprintf("%v %+v %#v", err, err, err)
	if strings.Contains(msg, wrong) || strings.Contains(msg, string(tok.UserPIN)) {
		t.Fatalf("error reveals a PIN: %s", msg)
	}

	// While a good HSM is logged in to the token, a wrong PIN is still refused.
	good := openHSM(t, testConfig(tok), nil)
	if _, err := hsm.Open(context.Background(), cfg); !errors.Is(err, hsm.ErrLogin) {
		t.Fatalf("Open with a wrong PIN beside a logged-in HSM = %v, want ErrLogin", err)
	}
	if err := good.Ready(context.Background()); err != nil {
		t.Fatalf("Ready of the good HSM: %v", err)
	}
}

func TestTokenNotFound(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	cfg := testConfig(tok)
	cfg.TokenLabel = "no-such-token"
	if _, err := hsm.Open(context.Background(), cfg); !errors.Is(err, hsm.ErrTokenNotFound) {
		t.Fatalf("Open(unknown label) = %v, want ErrTokenNotFound", err)
	}
}

func TestPINFromDescriptor(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := w.Write(append(tok.UserPIN, '\n')); err != nil {
		t.Fatal(err)
	}
	w.Close()
	cfg := testConfig(tok)
	cfg.PINFile = ""
	fd, err := dupFD(r)
	if err != nil {
		t.Fatal(err)
	}
	cfg.PINFD = fd
	h := openHSM(t, cfg, nil)
	if err := h.Ready(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := hsm.Config{Module: "/x.so", TokenLabel: "t", PINFile: "/p"}
	if err := ok.Validate(); err != nil {
		t.Fatalf("Validate(%v) = %v", ok, err)
	}
	for _, tc := range []struct {
		edit func(*hsm.Config)
		want string
	}{
		{func(c *hsm.Config) { c.Module = "" }, "hsm.module is required"},
		{func(c *hsm.Config) { c.Module = "/x.so?pin-value=1234" }, "hsm.module must not contain pin-value="},
		{func(c *hsm.Config) { c.TokenLabel = "" }, "hsm.token_label is required"},
		{func(c *hsm.Config) { c.TokenLabel = "t;PIN-VALUE=1234" }, "hsm.token_label must not contain pin-value="},
		{func(c *hsm.Config) { c.PINFile = "" }, "hsm.pin_file or hsm.pin_fd is required"},
		{func(c *hsm.Config) { c.PINFD = 3 }, "mutually exclusive"},
		{func(c *hsm.Config) { c.Sessions = -1 }, "hsm.sessions"},
		{func(c *hsm.Config) { c.CallTimeout = -time.Second }, "hsm.call_timeout"},
		{func(c *hsm.Config) { c.RecoveryHoldDown = 500 * time.Millisecond }, "hsm.recovery_hold_down must be at least 1s"},
		{func(c *hsm.Config) { c.RecoveryMaxBackoff = 500 * time.Millisecond }, "hsm.recovery_max_backoff"},
		{func(c *hsm.Config) {
			c.RecoveryHoldDown, c.RecoveryMaxBackoff = 5*time.Second, 2*time.Second
		}, "hsm.recovery_max_backoff must be at least hsm.recovery_hold_down"},
	} {
		c := ok
		tc.edit(&c)
		err := c.Validate()
		if !errors.Is(err, hsm.ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%v) = %v, want %q", c, err, tc.want)
		}
		if strings.Contains(fmt.Sprint(err), "1234") {
			t.Errorf("Validate error repeats the pin-value: %v", err)
		}
	}
	if s := fmt.Sprintf("%v %+v %#v", ok, ok, ok); !strings.Contains(s, "file:/p") {
		t.Errorf("Config prints as %s", s)
	}
}

func TestPINFileLimits(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	cfg := testConfig(tok)
	dir := t.TempDir()
	for name, content := range map[string][]byte{
		"empty": []byte("\n"),
		"big":   []byte(strings.Repeat("1", hsm.MaxPINSize+1)),
	} {
		cfg.PINFile = filepath.Join(dir, name)
		if err := os.WriteFile(cfg.PINFile, content, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := hsm.Open(context.Background(), cfg); !errors.Is(err, hsm.ErrLogin) {
			t.Errorf("%s PIN file: Open = %v, want ErrLogin", name, err)
		}
	}
	cfg.PINFile = filepath.Join(dir, "missing")
	if _, err := hsm.Open(context.Background(), cfg); !errors.Is(err, hsm.ErrLogin) {
		t.Errorf("missing PIN file: Open = %v, want ErrLogin", err)
	}
}
