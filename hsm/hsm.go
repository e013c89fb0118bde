package hsm

import (
	"context"
	"crypto/hmac"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// HSM is a logged-in PKCS#11 token with a fixed pool of sessions.
//
// An HSM is safe for concurrent use by many goroutines. Every operation
// holds one pooled session for its duration and runs under a deadline (the
// earlier of its context's and Config.CallTimeout); waiting for a session is
// bounded the same way. PKCS#11 calls cannot be cancelled, so at the deadline
// the caller gets a retryable ErrTimeout while the call finishes in the
// background; its session goes back to the pool only when it has finished.
//
// After a recoverable fatal error the HSM recovers by itself in the
// background (see the package doc, "Recovery"). Whoever calls Open must
// call Close.
type HSM struct {
	cfg    Config
	log    *slog.Logger
	lm     *loadedModule
	count  *countingModule
	mod    Module        // count, possibly wrapped
	slot   atomic.Uint64 // the token's slot; recovery may move it
	serial string        // the token's serial number, checked by recovery

	pool     chan pkcs11.SessionHandle // 0 marks a slot whose session must be (re)opened
	closed   chan struct{}             // closed by Close
	mu       sync.Mutex                // guards closing and inflight.Add
	closing  bool
	inflight sync.WaitGroup
	joined   bool          // registered as a user of the token's login
	loginMu  sync.Mutex    // serialises re-logins
	loginGen atomic.Uint64 // number of successful re-logins
	ready    readyProbe

	fatal atomic.Pointer[fatalState]
	// down is closed when the HSM goes fatal, so that calls waiting for a
	// session give up at once; recovery installs a new one.
	down atomic.Pointer[chan struct{}]
	// gen counts recoveries: sessions and key handles of an older
	// generation are never used (see objRef).
	gen    atomic.Uint64
	keysMu sync.Mutex // serialises storing keys with changing gen
	keys   atomic.Pointer[keySet]
	stats  recoveryStats

	closeOnce sync.Once
	closeErr  error
}

// fatalState is the recorded fatal error. It is replaced, never changed.
type fatalState struct {
	err         error     // the first fatal error, or the one that made recovery give up
	at          time.Time // when the token went unusable
	recoverable bool      // recovery runs (or will) in the background
	attempts    int       // recovery attempts made so far
	last        error     // the last failed attempt's error
}

// Open loads cfg.Module (sharing it with other HSMs in the process), finds
// the token labelled cfg.TokenLabel, logs in as the user with the PIN read
// once from cfg.PINFile or cfg.PINFD, and opens cfg.Sessions sessions.
// The PIN buffer is cleared after login (best effort: the PKCS#11 binding
// copies it into C memory it does not clear).
//
// Errors: ErrInvalidConfig; ErrTokenNotFound; ErrLogin (wrong, locked or
// unreadable PIN; the message never holds the PIN); ErrTimeout if ctx or
// CallTimeout expires first. Open does not load keys: call LoadKeys (or
// InitKeys for a new token).
func Open(ctx context.Context, cfg Config) (*HSM, error) {
	return OpenWithModuleWrapper(ctx, cfg, nil)
}

// OpenWithModuleWrapper is Open with wrap (if not nil) placed between the
// HSM and the loaded module, for fault injection and delays in tests. wrap
// receives the session-counting view of the module and must forward to it.
func OpenWithModuleWrapper(ctx context.Context, cfg Config, wrap func(Module) Module) (*HSM, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	pin, err := cfg.readPIN()
	if err != nil {
		return nil, err
	}
	lm, err := acquireModule(cfg.Module)
	if err != nil {
		clear(pin)
		return nil, err
	}
	h := &HSM{
		cfg:    cfg,
		log:    cfg.Logger,
		lm:     lm,
		count:  &countingModule{Module: lm.ctx},
		pool:   make(chan pkcs11.SessionHandle, cfg.Sessions),
		closed: make(chan struct{}),
	}
	down := make(chan struct{})
	h.down.Store(&down)
	h.mod = Module(h.count)
	if wrap != nil {
		h.mod = wrap(h.count)
	}
	if err := h.startWithin(ctx, pin); err != nil {
		return nil, err
	}
	return h, nil
}

// startWithin runs start (which clears pin) under the deadline of ctx and
// CallTimeout. If the deadline passes first, whatever start opened is
// closed when it finishes.
func (h *HSM) startWithin(ctx context.Context, pin []byte) error {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.CallTimeout)
	defer cancel()
	h.inflight.Add(1)
	done := make(chan error, 1)
	go func() {
		defer h.inflight.Done()
		err := h.start(pin)
		clear(pin)
		if err != nil {
			h.teardown()
		}
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		go func() {
			if <-done == nil {
				h.Close()
			}
		}()
		return ctxErr("open", ErrTimeout, ctx.Err())
	}
}

// start finds the token, logs in and fills the pool.
func (h *HSM) start(pin []byte) error {
	slot, ti, err := h.findSlot()
	if err != nil {
		return err
	}
	h.slot.Store(uint64(slot))
	h.serial = ti.SerialNumber
	for i := range h.cfg.Sessions {
		s, err := h.openSession()
		if err != nil {
			return err
		}
		h.pool <- s
		if i == 0 {
			if err := h.login(slot, s, pin); err != nil {
				return err
			}
		}
	}
	return nil
}

// findSlot returns the slot of the token labelled Config.TokenLabel and its
// token information.
func (h *HSM) findSlot() (uint, pkcs11.TokenInfo, error) {
	slots, err := h.mod.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, wrapErr("slot list", err)
	}
	var found []uint
	var info pkcs11.TokenInfo
	for _, s := range slots {
		ti, err := h.mod.GetTokenInfo(s)
		if err == nil && ti.Label == h.cfg.TokenLabel {
			found, info = append(found, s), ti
		}
	}
	switch len(found) {
	case 0:
		return 0, info, fmt.Errorf("%w: no token labelled %q in %s", ErrTokenNotFound, h.cfg.TokenLabel, h.cfg.Module)
	case 1:
		return found[0], info, nil
	}
	return 0, info, fmt.Errorf("hsm: %d tokens labelled %q in %s; labels must be unique", len(found), h.cfg.TokenLabel, h.cfg.Module)
}

// slotID returns the token's current slot.
func (h *HSM) slotID() uint { return uint(h.slot.Load()) }

func (h *HSM) openSession() (pkcs11.SessionHandle, error) {
	return h.openSessionOn(h.slotID())
}

func (h *HSM) openSessionOn(slot uint) (pkcs11.SessionHandle, error) {
	s, err := h.mod.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return 0, wrapErr("open session", err)
	}
	return s, nil
}

// login logs the user in on s, a session on slot. The login state is per
// process and token, so if another HSM of this process is already logged
// in to the token, the PIN is checked against a keyed fingerprint of the
// PIN that logged in.
func (h *HSM) login(slot uint, s pkcs11.SessionHandle, pin []byte) error {
	mac := h.lm.pinMAC(pin)
	prev := h.lm.joinToken(slot)
	h.joined = true
	err := h.mod.Login(s, pkcs11.CKU_USER, pinString(pin))
	switch {
	case err == nil:
		h.lm.setLogin(slot, mac)
		return nil
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)):
		if prev != nil && hmac.Equal(prev, mac) {
			return nil
		}
		return fmt.Errorf("%w: token %q is already logged in by this process with another PIN", ErrLogin, h.cfg.TokenLabel)
	}
	return fmt.Errorf("%w: token %q (check %s): %w", ErrLogin, h.cfg.TokenLabel, pinSource(h.cfg), wrapErr("login", err))
}

// relogin logs in again after the token reported CKR_USER_NOT_LOGGED_IN on
// session s to a call that started at login generation seen. Every session
// in use sees the loss, so relogin makes sure it costs at most one login
// attempt: calls are serialised; if the HSM has gone fatal meanwhile it
// returns that error, and if another call has logged in again since seen it
// returns nil, both without touching the token. A failed attempt (wrong or
// changed PIN, locked PIN, unreadable PIN file) is recorded as fatal before
// the next caller gets the lock, so a bad PIN is never tried twice: tokens
// lock the PIN after a few failures. Otherwise nil means logged in again.
func (h *HSM) relogin(op string, s pkcs11.SessionHandle, seen uint64) error {
	h.loginMu.Lock()
	defer h.loginMu.Unlock()
	if err := h.fatalErr(op); err != nil {
		return err
	}
	if h.loginGen.Load() != seen {
		return nil
	}
	if err := h.loginAgain(s); err != nil {
		return h.noteFatal(&Error{Op: op, Class: ClassFatal, Err: err})
	}
	h.loginGen.Add(1)
	return nil
}

// loginAgain re-reads the PIN (file or source) and logs the user in on s.
// A PIN from a descriptor cannot be read twice, so then the login loss is
// final.
func (h *HSM) loginAgain(s pkcs11.SessionHandle) error {
	if !h.canReadPIN() {
		return fmt.Errorf("%w: login lost and the PIN came from a descriptor, which cannot be read again", ErrLogin)
	}
	pin, err := h.cfg.readPIN()
	if err != nil {
		return err
	}
	defer clear(pin)
	err = h.mod.Login(s, pkcs11.CKU_USER, pinString(pin))
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		return fmt.Errorf("%w: re-login to token %q: %w", ErrLogin, h.cfg.TokenLabel, err)
	}
	return nil
}

// canReadPIN reports whether the PIN can be read again for another login:
// a file or the TPM can, a descriptor cannot.
func (h *HSM) canReadPIN() bool { return h.cfg.PINFile != "" || h.cfg.PINSource != nil }

func pinSource(c Config) string {
	if c.PINSource != nil {
		return "the TPM-sealed PIN"
	}
	if c.PINFile != "" {
		return "hsm.pin_file"
	}
	return "hsm.pin_fd"
}

// pinString views pin as a string without copying, so that clearing pin
// also clears what the string showed. The callee must not retain it
// (*pkcs11.Ctx copies it into C memory).
func pinString(pin []byte) string {
	if len(pin) == 0 {
		return ""
	}
	return unsafe.String(unsafe.SliceData(pin), len(pin))
}

// noteFatal records err if it is fatal, so that Ready and later calls fail,
// and starts recovery if err may pass without an operator (see
// recoverable). Only the first fatal error of an outage is recorded.
func (h *HSM) noteFatal(err error) error {
	if !IsFatal(err) {
		return err
	}
	st := &fatalState{err: err, at: time.Now(), recoverable: recoverable(err) && h.canReadPIN()}
	if h.fatal.CompareAndSwap(nil, st) {
		close(*h.down.Load())
		h.wentDown(st)
	}
	return err
}

// OpenSessions returns the number of sessions this HSM has opened and not
// yet closed, as counted at the module boundary. After Close has returned
// nil it is 0.
func (h *HSM) OpenSessions() int { return int(h.count.open.Load()) }

// Close stops a recovery in progress (see the package doc, "Recovery"),
// waits up to CallTimeout for calls in flight (and a recovery attempt under
// way), closes every session, logs out (when no other HSM of this process
// uses the token) and releases the module (finalizing it when this was its
// last user). Close is safe to call more than once; later calls return nil.
// If calls are still running at the timeout, Close returns an ErrTimeout
// error and finishes the teardown in the background when they complete.
func (h *HSM) Close() error {
	first := false
	h.closeOnce.Do(func() {
		first = true
		h.closeErr = h.close()
	})
	if !first {
		return nil
	}
	return h.closeErr
}

func (h *HSM) close() error {
	h.mu.Lock()
	h.closing = true
	close(h.closed)
	h.mu.Unlock()
	idle := make(chan struct{})
	go func() { h.inflight.Wait(); close(idle) }()
	t := time.NewTimer(h.cfg.CallTimeout)
	defer t.Stop()
	select {
	case <-idle:
		return h.teardown()
	case <-t.C:
		go func() { <-idle; h.teardown() }()
		return fmt.Errorf("hsm: close: %w: calls still in flight; sessions are closed when they finish", ErrTimeout)
	}
}

// teardown closes the pooled sessions and releases the module. Nothing may
// be in flight.
func (h *HSM) teardown() error {
	var sessions []pkcs11.SessionHandle
	for len(h.pool) > 0 {
		if s := <-h.pool; s != 0 {
			sessions = append(sessions, s)
		}
	}
	if h.joined && h.lm.leaveToken(h.slotID()) && len(sessions) > 0 {
		_ = h.mod.Logout(sessions[0]) // closing the last session logs out anyway
	}
	var errs []error
	for _, s := range sessions {
		if err := h.mod.CloseSession(s); err != nil {
			errs = append(errs, wrapErr("close session", err))
		}
	}
	errs = append(errs, h.lm.release())
	return errors.Join(errs...)
}
