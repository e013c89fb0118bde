package hsm_test

import (
	"context"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
)

// hookModule counts calls and injects faults that the test arms at run
// time.
type hookModule struct {
	hsm.Module
	signInitErr atomic.Uint64 // if not 0, SignInit returns it
	// lost, if set, makes HMACs fail with CKR_USER_NOT_LOGGED_IN, as on a
	// token that lost the login (no real operation is started).
	lost atomic.Bool
	// logoutOnLogin makes Login log the token out first, so that SoftHSM
	// checks the PIN (while logged in it answers CKR_USER_ALREADY_LOGGED_IN
	// to any PIN).
	logoutOnLogin atomic.Bool
	signInits     atomic.Int32
	logins        atomic.Int32
	tokenInfos    atomic.Int32
	// infoBlock, if set, makes GetTokenInfo wait until it is closed.
	infoBlock atomic.Pointer[chan struct{}]
	// barrier, if set, makes Sign wait until want calls have arrived.
	barrier atomic.Pointer[chan struct{}]
	arrived atomic.Int32
	want    int32
}

func (m *hookModule) SignInit(s pkcs11.SessionHandle, mech []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	m.signInits.Add(1)
	if rv := m.signInitErr.Load(); rv != 0 {
		return pkcs11.Error(rv)
	}
	if m.lost.Load() {
		return nil
	}
	return m.Module.SignInit(s, mech, o)
}

func (m *hookModule) Sign(s pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	if b := m.barrier.Load(); b != nil {
		if m.arrived.Add(1) == m.want {
			close(*b)
		}
		<-*b
	}
	if m.lost.Load() {
		return nil, pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	return m.Module.Sign(s, msg)
}

func (m *hookModule) Login(s pkcs11.SessionHandle, userType uint, pin string) error {
	m.logins.Add(1)
	if m.logoutOnLogin.Load() {
		_ = m.Module.Logout(s)
	}
	return m.Module.Login(s, userType, pin)
}

func (m *hookModule) GetTokenInfo(slot uint) (pkcs11.TokenInfo, error) {
	m.tokenInfos.Add(1)
	if block := m.infoBlock.Load(); block != nil {
		<-*block
	}
	return m.Module.GetTokenInfo(slot)
}

// openHooked opens the keyed token tok through a hookModule and loads keys.
func openHooked(t *testing.T, cfg hsm.Config) (*hsm.HSM, *hookModule) {
	t.Helper()
	m := &hookModule{}
	h := openHSM(t, cfg, func(mod hsm.Module) hsm.Module { m.Module = mod; return m })
	if err := h.LoadKeys(context.Background()); err != nil {
		t.Fatalf("LoadKeys: %v", err)
	}
	m.logins.Store(0)
	m.tokenInfos.Store(0)
	m.signInits.Store(0) // LoadKeys records an HMAC answer for each kdk
	return h, m
}

// TestReloginWrongPINTriedOnce: when the login is lost on every session
// and the PIN file now holds a wrong PIN, many concurrent callers cause at
// most one login attempt; the HSM goes fatal and later calls fail fast
// without reaching the module.
func TestReloginWrongPINTriedOnce(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.Sessions = 8
	h, m := openHooked(t, cfg)
	if err := os.WriteFile(tok.PINFile, []byte("wrong-pin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m.logoutOnLogin.Store(true)
	m.lost.Store(true)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for range 5 {
				if _, err := h.PRF(ctx, 1, []byte("x")); err == nil {
					t.Error("PRF succeeded with the login lost")
				}
			}
		})
	}
	wg.Wait()
	if n := m.logins.Load(); n != 1 {
		t.Fatalf("%d login attempts with a wrong PIN, want 1", n)
	}
	if err := h.Ready(ctx); !hsm.IsFatal(err) || !errors.Is(err, hsm.ErrLogin) {
		t.Fatalf("Ready after a failed re-login = %v, want fatal ErrLogin", err)
	}
	before := m.signInits.Load()
	if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsFatal(err) {
		t.Fatalf("PRF after a failed re-login = %v, want fatal", err)
	}
	if m.signInits.Load() != before || m.logins.Load() != 1 {
		t.Fatal("a call after the fatal error reached the module")
	}
}

// TestReloginOncePerLoss: a login lost on all sessions at once is
// restored by one login attempt, not one per session, and calls then
// succeed.
func TestReloginOncePerLoss(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.Sessions = 4
	h, m := openHooked(t, cfg)
	// The barrier in Sign makes every session see the loss before anyone
	// logs in again; SoftHSM, still logged in, accepts the login.
	barrier := make(chan struct{})
	m.want = int32(cfg.Sessions)
	m.barrier.Store(&barrier)
	m.lost.Store(true)
	var wg sync.WaitGroup
	for range cfg.Sessions {
		wg.Go(func() {
			if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsRetryable(err) {
				t.Errorf("PRF with the login lost = %v, want retryable", err)
			}
		})
	}
	wg.Wait()
	m.lost.Store(false)
	m.barrier.Store(nil)
	if n := m.logins.Load(); n != 1 {
		t.Fatalf("%d login attempts for one loss on %d sessions, want 1", n, cfg.Sessions)
	}
	if _, err := h.PRF(ctx, 1, []byte("x")); err != nil {
		t.Fatalf("PRF after re-login: %v", err)
	}
	if err := h.Ready(ctx); err != nil {
		t.Fatalf("Ready after re-login: %v", err)
	}
}

// TestStaleKeyHandlesAreFatal: an invalid key or object handle means the
// token's objects were replaced under us: the call fails fatally and Ready
// fails; Ready also finds it by itself, without any traffic.
func TestStaleKeyHandlesAreFatal(t *testing.T) {
	for _, rv := range []uint{pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_OBJECT_HANDLE_INVALID} {
		ctx := context.Background()
		_, tok := newKeyedHSM(t)
		h, m := openHooked(t, testConfig(tok))
		m.signInitErr.Store(uint64(rv))
		if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsFatal(err) {
			t.Fatalf("PRF with 0x%x = %v, want fatal", rv, err)
		}
		if err := h.Ready(ctx); !errors.Is(err, hsm.ErrFatal) {
			t.Fatalf("Ready after 0x%x = %v, want fatal", rv, err)
		}

		h2, m2 := openHooked(t, testConfig(tok))
		m2.signInitErr.Store(uint64(rv))
		if err := h2.Ready(ctx); !errors.Is(err, hsm.ErrFatal) {
			t.Fatalf("Ready with key handles gone (0x%x) = %v, want fatal", rv, err)
		}
	}
}

// TestReadyProbeHung: while the module hangs in the readiness probe, more
// probes start no new module call and fail with a retryable error; once
// the probe stuck past CallTimeout they fail at once. After the module
// recovers, Ready passes again and Close leaves nothing open.
func TestReadyProbeHung(t *testing.T) {
	_, tok := newKeyedHSM(t)
	cfg := testConfig(tok)
	cfg.CallTimeout = 300 * time.Millisecond
	h, m := openHooked(t, cfg)
	// A result is reused: two probes in a row ask the module once.
	for range 2 {
		if err := h.Ready(context.Background()); err != nil {
			t.Fatalf("Ready: %v", err)
		}
	}
	if m.tokenInfos.Load() != 1 || m.signInits.Load() != 1 {
		t.Fatalf("two Ready calls made %d GetTokenInfo and %d HMAC calls, want 1 each", m.tokenInfos.Load(), m.signInits.Load())
	}
	time.Sleep(time.Second) // let the result expire
	m.tokenInfos.Store(0)
	block := make(chan struct{})
	m.infoBlock.Store(&block)
	for range 10 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		err := h.Ready(ctx)
		cancel()
		if !errors.Is(err, hsm.ErrTimeout) || !hsm.IsRetryable(err) {
			t.Fatalf("Ready with the module hung = %v, want retryable ErrTimeout", err)
		}
	}
	time.Sleep(cfg.CallTimeout)
	t0 := time.Now()
	if err := h.Ready(context.Background()); !errors.Is(err, hsm.ErrTimeout) || time.Since(t0) > 100*time.Millisecond {
		t.Fatalf("Ready with a probe stuck past CallTimeout = %v after %v", err, time.Since(t0))
	}
	if n := m.tokenInfos.Load(); n != 1 {
		t.Fatalf("%d GetTokenInfo calls while the module hung, want 1", n)
	}
	m.infoBlock.Store(nil)
	close(block)
	deadline := time.Now().Add(5 * time.Second)
	for h.Ready(context.Background()) != nil {
		if time.Now().After(deadline) {
			t.Fatal("Ready still failing after the module recovered")
		}
		time.Sleep(10 * time.Millisecond)
	}
	checkedClose(t, h)
}

// TestExpiredContextStartsNoWork: a call whose context is already done
// never starts an HSM operation, even though a session is free.
func TestExpiredContextStartsNoWork(t *testing.T) {
	_, tok := newKeyedHSM(t)
	h, m := openHooked(t, testConfig(tok))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	for range 100 {
		if _, err := h.PRF(ctx, 1, []byte("x")); !errors.Is(err, context.Canceled) {
			t.Fatalf("PRF with a cancelled context = %v", err)
		}
		if _, err := h.PRF(expired, 1, []byte("x")); !hsm.IsRetryable(err) {
			t.Fatalf("PRF with an expired context = %v, want retryable", err)
		}
	}
	if n := m.signInits.Load(); n != 0 {
		t.Fatalf("%d operations started for callers that had given up", n)
	}
}
