package hsm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

func TestConcurrentPRF(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.Sessions = 2
	h := openHSM(t, cfg, nil)
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	want := make([][]byte, 8)
	for i := range want {
		var err error
		if want[i], err = h.PRF(ctx, 1, fmt.Appendf(nil, "msg %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for g := range 32 {
		wg.Go(func() {
			for i := range 50 {
				k := (g + i) % len(want)
				got, err := h.PRF(ctx, 1, fmt.Appendf(nil, "msg %d", k))
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, want[k]) {
					errs <- fmt.Errorf("PRF(msg %d) differs", k)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := h.OpenSessions(); n != cfg.Sessions {
		t.Errorf("OpenSessions = %d, want %d", n, cfg.Sessions)
	}
}

// TestDeadlines: a call stuck in the module returns a retryable ErrTimeout
// at the deadline; a caller waiting for the only session gets a retryable
// ErrBusy; when the stuck call finishes, its session serves again.
func TestDeadlines(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.Sessions = 1
	cfg.CallTimeout = 300 * time.Millisecond
	h, f := openFaulty(t, tok, cfg)
	block := make(chan struct{})
	f.mu.Lock()
	f.block, f.entered = block, make(chan struct{}, 1)
	f.mu.Unlock()

	stuck := make(chan error, 1)
	start := time.Now()
	go func() { _, err := h.PRF(ctx, 1, []byte("x")); stuck <- err }()
	<-f.entered
	_, err := h.PRF(ctx, 1, []byte("y"))
	if !errors.Is(err, hsm.ErrBusy) || !hsm.IsRetryable(err) {
		t.Fatalf("PRF with the pool exhausted = %v, want retryable ErrBusy", err)
	}
	err = <-stuck
	if !errors.Is(err, hsm.ErrTimeout) || !hsm.IsRetryable(err) {
		t.Fatalf("stuck PRF = %v, want retryable ErrTimeout", err)
	}
	if d := time.Since(start); d > 3*cfg.CallTimeout {
		t.Fatalf("stuck PRF returned after %v, deadline %v", d, cfg.CallTimeout)
	}
	// A shorter caller deadline wins over CallTimeout.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	if _, err := h.PRF(short, 1, []byte("z")); !errors.Is(err, hsm.ErrBusy) || time.Since(t0) > cfg.CallTimeout {
		t.Fatalf("PRF with 50ms deadline = %v after %v", err, time.Since(t0))
	}
	if n := h.OpenSessions(); n != 1 {
		t.Fatalf("OpenSessions while stuck = %d, want 1", n)
	}
	f.mu.Lock()
	f.block = nil
	f.mu.Unlock()
	close(block)
	if _, err := h.PRF(ctx, 1, []byte("x")); err != nil {
		t.Fatalf("PRF after the stuck call finished: %v", err)
	}
}

// TestSessionLostIsRetryable: CKR_SESSION_HANDLE_INVALID fails the call
// with a retryable error (no internal retry), the session is replaced, and
// the next call succeeds.
func TestSessionLostIsRetryable(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.Sessions = 1
	h, f := openFaulty(t, tok, cfg)
	for _, rv := range []uint{pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_SESSION_CLOSED} {
		f.failNext(rv)
		_, err := h.PRF(ctx, 1, []byte("x"))
		var perr pkcs11.Error
		if !hsm.IsRetryable(err) || hsm.IsFatal(err) || !errors.As(err, &perr) || uint(perr) != rv {
			t.Fatalf("PRF with 0x%x injected = %v, want retryable", rv, err)
		}
		if _, err := h.PRF(ctx, 1, []byte("x")); err != nil {
			t.Fatalf("PRF after a lost session: %v", err)
		}
		if err := h.Ready(ctx); err != nil {
			t.Fatalf("Ready after a lost session: %v", err)
		}
		if n := h.OpenSessions(); n != 1 {
			t.Fatalf("OpenSessions = %d, want 1", n)
		}
	}
}

// TestUserNotLoggedInRelogs: one CKR_USER_NOT_LOGGED_IN makes the HSM log
// in again; the call is retryable and the next one succeeds.
func TestUserNotLoggedInRelogs(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	h, f := openFaulty(t, tok, testConfig(tok))
	f.failNext(pkcs11.CKR_USER_NOT_LOGGED_IN)
	if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsRetryable(err) {
		t.Fatalf("PRF with login lost = %v, want retryable", err)
	}
	if _, err := h.PRF(ctx, 1, []byte("x")); err != nil {
		t.Fatalf("PRF after re-login: %v", err)
	}
	if err := h.Ready(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestFatalErrorsFailReady(t *testing.T) {
	for _, rv := range []uint{pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_EXPIRED} {
		t.Run(fmt.Sprintf("0x%x", rv), func(t *testing.T) {
			ctx := context.Background()
			_, tok := newKeyedHSM(t)
			h, f := openFaulty(t, tok, testConfig(tok))
			if err := h.Ready(ctx); err != nil {
				t.Fatalf("Ready before the fault: %v", err)
			}
			f.failNext(rv)
			_, err := h.PRF(ctx, 1, []byte("x"))
			if !hsm.IsFatal(err) || hsm.IsRetryable(err) {
				t.Fatalf("PRF with 0x%x = %v, want fatal", rv, err)
			}
			if err := h.Ready(ctx); !hsm.IsFatal(err) {
				t.Fatalf("Ready after a fatal error = %v, want fatal", err)
			}
			if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsFatal(err) {
				t.Fatalf("PRF after a fatal error = %v, want fatal", err)
			}
		})
	}
}

func TestClosed(t *testing.T) {
	ctx := context.Background()
	h, _ := newKeyedHSM(t)
	checkedClose(t, h)
	if _, err := h.PRF(ctx, 1, []byte("x")); !errors.Is(err, hsm.ErrClosed) {
		t.Fatalf("PRF after Close = %v, want ErrClosed", err)
	}
	if err := h.Ready(ctx); !errors.Is(err, hsm.ErrClosed) {
		t.Fatalf("Ready after Close = %v, want ErrClosed", err)
	}
}

// TestCloseWithCallInFlight: Close gives up after CallTimeout while a call
// is stuck, and the session is closed once the call completes.
func TestCloseWithCallInFlight(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.CallTimeout = 200 * time.Millisecond
	f := &faultModule{}
	h, err := hsm.OpenWithModuleWrapper(ctx, cfg, func(m hsm.Module) hsm.Module { f.Module = m; return f })
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	block := make(chan struct{})
	f.mu.Lock()
	f.block, f.entered = block, make(chan struct{}, 1)
	f.mu.Unlock()
	go h.PRF(ctx, 1, []byte("x"))
	<-f.entered
	if err := h.Close(); !errors.Is(err, hsm.ErrTimeout) {
		t.Fatalf("Close with a stuck call = %v, want ErrTimeout", err)
	}
	if err := h.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	close(block)
	deadline := time.Now().Add(5 * time.Second)
	for h.OpenSessions() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("OpenSessions = %d long after the stuck call finished", h.OpenSessions())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func BenchmarkPRF(b *testing.B) {
	ctx := context.Background()
	tok := softhsm.NewTestToken(b)
	cfg := hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile}
	h, err := hsm.Open(ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	if err := h.InitKeys(ctx); err != nil {
		b.Fatal(err)
	}
	msg := []byte("hsmd/dek/v1 tenant 42 seed")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := h.PRF(ctx, 1, msg); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
