package hsmfault_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/hsmfault"
	"github.com/hsmd/hsmd/softhsm"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// openKeyed opens a fresh SoftHSM token with root keys through in.
func openKeyed(t *testing.T, in *hsmfault.Injector) *hsm.HSM {
	t.Helper()
	ctx := context.Background()
	tok := softhsm.NewTestToken(t)
	cfg := hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, Sessions: 2, CallTimeout: 2 * time.Second}
	h, err := hsm.OpenWithModuleWrapper(ctx, cfg, in.Wrap)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if n := h.OpenSessions(); n != 0 {
			t.Errorf("%d sessions open after Close", n)
		}
	})
	if err := h.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestSessionInvalidLosesTheSession: the fault really closes the session;
// the HSM replaces it, its session count stays right, and the next call
// succeeds.
func TestSessionInvalidLosesTheSession(t *testing.T) {
	ctx := context.Background()
	in := hsmfault.New(1)
	h := openKeyed(t, in)
	in.SetRandom(hsmfault.Random{Rate: 1, Kinds: []hsmfault.Kind{hsmfault.SessionInvalid}})
	_, err := h.PRF(ctx, 1, []byte("x"))
	if !hsm.IsRetryable(err) || !errors.Is(err, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)) {
		t.Fatalf("PRF = %v, want a retryable CKR_SESSION_HANDLE_INVALID", err)
	}
	in.Stop()
	if _, err := h.PRF(ctx, 1, []byte("x")); err != nil {
		t.Fatalf("PRF after the session was replaced: %v", err)
	}
	if n := h.OpenSessions(); n != 2 {
		t.Fatalf("OpenSessions = %d, want the pool's 2", n)
	}
	if in.Count(hsmfault.SessionInvalid) != 1 {
		t.Fatalf("%d faults counted, want 1", in.Count(hsmfault.SessionInvalid))
	}
}

// TestBursts: a TOKEN_NOT_PRESENT or PIN_EXPIRED burst makes the HSM fatal
// at once; it stays so through the hold-down, then recovers in place by
// itself, logging in once.
func TestBursts(t *testing.T) {
	for _, k := range []hsmfault.Kind{hsmfault.TokenNotPresent, hsmfault.PINExpired} {
		t.Run(k.String(), func(t *testing.T) {
			ctx := context.Background()
			in := hsmfault.New(2)
			h := openKeyed(t, in)
			if err := h.LoadKeys(ctx); err != nil {
				t.Fatal(err)
			}
			want, err := h.PRF(ctx, 1, []byte("x"))
			if err != nil {
				t.Fatal(err)
			}
			logins := in.Logins()
			in.StartBurst(k)
			start := time.Now()
			if err := h.Ready(ctx); !hsm.IsFatal(err) {
				t.Fatalf("Ready in a %v burst = %v, want fatal", k, err)
			}
			in.StopBurst()
			if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsFatal(err) {
				t.Fatalf("PRF right after the burst (in the hold-down) = %v, want fatal", err)
			}
			for h.Ready(ctx) != nil {
				if time.Since(start) > hsm.DefaultRecoveryHoldDown+5*time.Second {
					t.Fatalf("not recovered %v after a %v burst: %v", time.Since(start), k, h.Ready(ctx))
				}
				time.Sleep(10 * time.Millisecond)
			}
			t.Logf("%v burst: ready again after %v (recovery: %+v)", k, time.Since(start).Round(time.Millisecond), h.Recoveries())
			if time.Since(start) < hsm.DefaultRecoveryHoldDown {
				t.Fatalf("recovered after %v, within the hold-down", time.Since(start))
			}
			if got, err := h.PRF(ctx, 1, []byte("x")); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("PRF after recovery = %x, %v; want %x", got, err, want)
			}
			if n := in.Logins() - logins; n != 1 {
				t.Fatalf("%d logins to recover, want 1", n)
			}
		})
	}
}

// TestSeedReplays: two injectors with one seed make the same decisions.
func TestSeedReplays(t *testing.T) {
	run := func() []bool {
		ctx := context.Background()
		in := hsmfault.New(42)
		h := openKeyed(t, in)
		in.SetRandom(hsmfault.Random{Rate: 0.3, Kinds: []hsmfault.Kind{hsmfault.DeviceError}})
		var out []bool
		for range 40 {
			_, err := h.PRF(ctx, 1, []byte("x"))
			out = append(out, err == nil)
		}
		return out
	}
	a, b := run(), run()
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("call %d: %v then %v with the same seed", i, a[i], b[i])
		}
	}
}

func TestSeedFromEnv(t *testing.T) {
	t.Setenv(hsmfault.EnvSeed, "12345")
	if s, replay, err := hsmfault.SeedFromEnv(); err != nil || !replay || s != 12345 {
		t.Fatalf("SeedFromEnv = %d, %v, %v", s, replay, err)
	}
	t.Setenv(hsmfault.EnvSeed, "x")
	if _, _, err := hsmfault.SeedFromEnv(); err == nil {
		t.Fatal("a bad seed was accepted")
	}
}
