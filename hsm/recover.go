package hsm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// In-place recovery (see the package doc, "Recovery"): after a recoverable
// fatal error one goroutine takes every pooled session (so no call runs),
// closes them, waits out the hold-down, then tries, with backoff, to find
// the same token again, open sessions, log in and find the same keys. Only
// a complete success is swapped in.

// The answers recorded at load for the secret keys, by which recovery
// recognises them: the HMAC of recoveryCheckMsg under a kdk, and the
// AES-GCM sealing of recoveryCheckPlain under a wrap key (with a random IV;
// recovery opens it).
var (
	recoveryCheckMsg   = []byte("hsmd/recovery-check/v1")
	recoveryCheckAAD   = []byte("hsmd/recovery-check/v1")
	recoveryCheckPlain = []byte("hsmd recovery check")
)

// errStaleHandles: the call used key handles or sessions from before a
// recovery. Retryable: the next call uses the new ones.
var errStaleHandles error = &classError{"hsm: key handles renewed by a recovery; retry", ClassRetryable}

// Recovery refusals: the token found, or its keys, are not the ones opened.
var (
	errOtherToken = errors.New("hsm: refusing a different token")
	errOtherKeys  = errors.New("hsm: refusing a token whose keys differ from those loaded")
)

// recordCheck computes the answer by which recovery recognises the secret
// key of spec (a kdk or a wrap key).
func recordCheck(m Module, s pkcs11.SessionHandle, spec kindSpec, key pkcs11.ObjectHandle) ([]byte, error) {
	if spec.kind == KindKDK {
		return hmacOn(m, s, "load keys", key, recoveryCheckMsg)
	}
	iv := make([]byte, gcmIVSize)
	if _, err := rand.Read(iv); err != nil {
		return nil, err
	}
	ct, err := gcmSealOn(m, s, key, iv, recoveryCheckPlain, recoveryCheckAAD)
	if err != nil {
		return nil, err
	}
	return append(iv, ct...), nil
}

// RecoveryStats describes an HSM's recoveries, for metrics.
type RecoveryStats struct {
	Recoveries uint64        // outages recovered from in place
	Attempts   uint64        // recovery attempts, failed ones included
	Last       time.Duration // the last recovered outage: its first fatal error → usable again
	Down       bool          // the token is unusable now
	Recovering bool          // it is, and recovery is running (false: an operator must act)
}

type recoveryStats struct {
	mu                   sync.Mutex
	recoveries, attempts uint64
	last                 time.Duration
}

// Recoveries returns the HSM's recovery figures. Safe for concurrent use.
func (h *HSM) Recoveries() RecoveryStats {
	h.stats.mu.Lock()
	st := RecoveryStats{Recoveries: h.stats.recoveries, Attempts: h.stats.attempts, Last: h.stats.last}
	h.stats.mu.Unlock()
	if f := h.fatal.Load(); f != nil {
		st.Down, st.Recovering = true, f.recoverable
	}
	return st
}

// wentDown logs the fatal state st just recorded and starts recovery if it
// is recoverable. It runs within a call in flight.
func (h *HSM) wentDown(st *fatalState) {
	ctx := context.Background()
	label := slog.String("token", h.cfg.TokenLabel)
	if !st.recoverable {
		reason := "PIN failure"
		if recoverable(st.err) {
			reason = "the PIN came from a descriptor and cannot be read again to log in"
		}
		h.log.LogAttrs(ctx, slog.LevelError, "hsm: token unusable; an operator must act, then restart hsmd",
			label, slog.String("class", "permanent"), slog.String("reason", reason), slog.Any("error", st.err))
		return
	}
	h.mu.Lock()
	if h.closing {
		h.mu.Unlock()
		return
	}
	h.inflight.Add(1) // a call is in flight, so the count is not zero
	h.mu.Unlock()
	h.log.LogAttrs(ctx, slog.LevelWarn, "hsm: token unusable; recovering in the background",
		label, slog.String("class", "recoverable"), slog.Duration("hold_down", h.cfg.RecoveryHoldDown), slog.Any("error", st.err))
	go h.recoverLoop(st)
}

// recoverLoop recovers from the outage st until it succeeds, meets a
// permanent error or the HSM is closed. It owns one h.inflight count.
func (h *HSM) recoverLoop(st *fatalState) {
	defer h.inflight.Done()
	held, ok := h.seizeSessions()
	if !ok {
		return
	}
	h.dropSessions(held)
	delay := h.cfg.RecoveryHoldDown
	wait := time.Until(st.at.Add(delay))
	for attempt := 1; ; attempt++ {
		if !h.sleep(wait) {
			h.release(held)
			return
		}
		r, err := h.recoverOnce()
		h.stats.mu.Lock()
		h.stats.attempts++
		h.stats.mu.Unlock()
		if err == nil {
			h.swapIn(r, st, attempt)
			return
		}
		wait = delay
		st = h.attemptFailed(st, attempt, err, wait)
		if !st.recoverable {
			h.release(held)
			return
		}
		delay = min(2*delay, h.cfg.RecoveryMaxBackoff)
	}
}

// attemptFailed records and logs a failed attempt and returns the new
// fatal state: still recoverable unless err is a PIN failure.
func (h *HSM) attemptFailed(st *fatalState, attempt int, err error, next time.Duration) *fatalState {
	n := *st
	n.attempts, n.last = attempt, err
	level, msg, attrs := slog.LevelWarn, "hsm: recovery attempt failed", []slog.Attr{
		slog.String("token", h.cfg.TokenLabel), slog.Int("attempt", attempt)}
	switch {
	case permanentAttempt(err):
		n.recoverable, n.err, n.last = false, &Error{Op: "recover", Class: ClassFatal, Err: err}, nil
		level, msg = slog.LevelError, "hsm: recovery gave up; an operator must act, then restart hsmd"
		attrs = append(attrs, slog.String("class", "permanent"))
	case errors.Is(err, errOtherToken), errors.Is(err, errOtherKeys):
		level = slog.LevelError
		attrs = append(attrs, slog.String("class", "refused"), slog.Duration("retry_in", next))
	default:
		attrs = append(attrs, slog.String("class", "recoverable"), slog.Duration("retry_in", next))
	}
	h.fatal.Store(&n)
	h.log.LogAttrs(context.Background(), level, msg, append(attrs, slog.Any("error", err))...)
	return &n
}

// permanentAttempt reports whether a recovery attempt's error needs an
// operator: a PIN failure (wrong, locked, invalid, unreadable, or a login
// refused for a reason that is not transient). Anything else is retried.
func permanentAttempt(err error) bool {
	var rv pkcs11.Error
	if errors.As(err, &rv) {
		switch uint(rv) {
		case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_LEN_RANGE, pkcs11.CKR_PIN_INVALID:
			return true
		}
	}
	return errors.Is(err, ErrLogin) && !recoverable(err)
}

// seizeSessions takes every pooled session, waiting for calls in flight to
// return theirs. It returns false, having put them back, if the HSM is
// closed meanwhile.
func (h *HSM) seizeSessions() ([]pkcs11.SessionHandle, bool) {
	held := make([]pkcs11.SessionHandle, 0, cap(h.pool))
	for len(held) < cap(h.pool) {
		select {
		case s := <-h.pool:
			held = append(held, s)
		case <-h.closed:
			h.release(held)
			return nil, false
		}
	}
	return held, true
}

// release returns held to the pool (for Close to close them).
func (h *HSM) release(held []pkcs11.SessionHandle) {
	for _, s := range held {
		h.pool <- s // never blocks: held came from the pool
	}
}

// dropSessions closes the sessions in held (errors ignored: they are
// likely gone with the token), zeroes them, and leaves the token's login.
func (h *HSM) dropSessions(held []pkcs11.SessionHandle) {
	for i, s := range held {
		if s != 0 {
			_ = h.mod.CloseSession(s)
			held[i] = 0
		}
	}
	if h.joined {
		h.lm.leaveToken(h.slotID())
		h.joined = false
	}
}

// sleep waits for d unless the HSM is closed first (then false).
func (h *HSM) sleep(d time.Duration) bool {
	t := time.NewTimer(max(d, 0))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-h.closed:
		return false
	}
}

// recovered is what a successful attempt found.
type recovered struct {
	slot     uint
	sessions []pkcs11.SessionHandle
	keys     *keySet // nil if no keys were loaded
}

// recoverOnce makes one attempt. On failure it leaves nothing open.
func (h *HSM) recoverOnce() (*recovered, error) {
	slot, err := h.findSameToken()
	if err != nil {
		return nil, err
	}
	r := &recovered{slot: slot}
	for range h.cfg.Sessions {
		s, err := h.openSessionOn(slot)
		if err != nil {
			h.abandon(r)
			return nil, err
		}
		r.sessions = append(r.sessions, s)
	}
	if err := h.loginAgainOn(slot, r.sessions[0]); err != nil {
		h.abandon(r)
		return nil, err
	}
	if r.keys, err = h.findSameKeys(r.sessions[0], h.gen.Load()+1); err != nil {
		h.abandon(r)
		return nil, err
	}
	return r, nil
}

// abandon closes what a failed attempt opened and leaves the login.
func (h *HSM) abandon(r *recovered) {
	for _, s := range r.sessions {
		_ = h.mod.CloseSession(s)
	}
	if h.joined {
		h.lm.leaveToken(r.slot)
		h.joined = false
	}
}

// findSameToken returns the slot of the token opened: the one labelled
// Config.TokenLabel with the serial number seen at Open. A token with that
// label and another serial number is refused. If the module lost its state
// it is initialized again (never finalized).
func (h *HSM) findSameToken() (uint, error) {
	slots, err := h.mod.GetSlotList(true)
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)) {
		if err := h.lm.reinitialize(); err != nil {
			return 0, err
		}
		slots, err = h.mod.GetSlotList(true)
	}
	if err != nil {
		return 0, wrapErr("slot list", err)
	}
	var same []uint
	var info pkcs11.TokenInfo
	var others []string
	for _, s := range slots {
		ti, err := h.mod.GetTokenInfo(s)
		switch {
		case err != nil || ti.Label != h.cfg.TokenLabel:
		case ti.SerialNumber != h.serial:
			others = append(others, ti.SerialNumber)
		default:
			same, info = append(same, s), ti
		}
	}
	switch {
	case len(same) > 1:
		return 0, fmt.Errorf("hsm: %d tokens labelled %q with serial number %q", len(same), h.cfg.TokenLabel, h.serial)
	case len(same) == 0 && len(others) > 0:
		return 0, fmt.Errorf("%w: token %q has serial number %q, want %q", errOtherToken, h.cfg.TokenLabel, others[0], h.serial)
	case len(same) == 0:
		return 0, fmt.Errorf("%w: no token labelled %q in %s", ErrTokenNotFound, h.cfg.TokenLabel, h.cfg.Module)
	case info.Flags&pkcs11.CKF_USER_PIN_FINAL_TRY != 0:
		// One wrong PIN more would lock the token: leave it to an operator.
		return 0, fmt.Errorf("%w: token %q allows one more PIN attempt only; not logging in", ErrLogin, h.cfg.TokenLabel)
	}
	if err := h.checkTokenInfo(info); err != nil {
		return 0, err
	}
	return same[0], nil
}

// loginAgainOn reads the PIN again, as Open did, and logs in on s.
func (h *HSM) loginAgainOn(slot uint, s pkcs11.SessionHandle) error {
	if !h.canReadPIN() {
		return fmt.Errorf("%w: the PIN came from a descriptor, which cannot be read again", ErrLogin)
	}
	pin, err := h.cfg.readPIN()
	if err != nil {
		return err
	}
	defer clear(pin)
	return h.login(slot, s, pin)
}

// findSameKeys finds, on s, every key loaded before the outage and checks
// it is the same key: a signing pair by its public key and a signature
// that verifies under the public key loaded, a secret key by the answer
// recorded at load. It returns them with handles of generation gen, or
// nil if no keys were loaded.
func (h *HSM) findSameKeys(s pkcs11.SessionHandle, gen uint64) (*keySet, error) {
	old := h.keys.Load()
	if old == nil {
		return nil, nil
	}
	found, err := scanRoots(h.mod, s)
	if err != nil {
		return nil, wrapErr("find keys", err)
	}
	ks := &keySet{byKind: make(map[string]map[uint32]rootKey, len(old.byKind))}
	for kind, vs := range old.byKind {
		spec, _ := specOf(kind)
		ks.byKind[kind] = make(map[uint32]rootKey, len(vs))
		for v, k := range vs {
			label := KeyLabel(kind, v)
			key, pub, err := spec.split(label, found[kind][v])
			if err != nil {
				return nil, fmt.Errorf("%w: %w", errOtherKeys, err)
			}
			if err := h.sameKey(s, spec, label, k, key, pub); err != nil {
				return nil, err
			}
			ks.byKind[kind][v] = rootKey{obj: objRef{key, gen}, pub: k.pub, check: k.check}
		}
	}
	return ks, nil
}

// sameKey checks that the objects key (and pub, for a pair) found under
// label are the key old loaded before the outage.
func (h *HSM) sameKey(s pkcs11.SessionHandle, spec kindSpec, label string, old rootKey, key, pub pkcs11.ObjectHandle) error {
	m := h.mod
	differs := func(what string) error { return fmt.Errorf("%w: %s: %s", errOtherKeys, label, what) }
	switch {
	case spec.pair:
		p, err := readPublic(m, s, spec, label, pub)
		if err != nil {
			return err
		}
		if !samePublic(old.pub, p) {
			return differs("the public key differs")
		}
		ok, err := signsFor(m, s, spec, key, old)
		if err != nil {
			return wrapErr("recover", err)
		}
		if !ok {
			return differs("its signature does not verify under the public key loaded")
		}
	case spec.kind == KindKDK:
		mac, err := hmacOn(m, s, "recover", key, recoveryCheckMsg)
		if err != nil {
			return wrapErr("recover", err)
		}
		if !hmac.Equal(mac, old.check) {
			return differs("its HMAC differs from the one recorded at load")
		}
	default:
		if len(old.check) < gcmIVSize {
			return differs("no answer was recorded at load")
		}
		pt, err := gcmOpenOn(m, s, key, old.check[:gcmIVSize], old.check[gcmIVSize:], recoveryCheckAAD)
		if err != nil && isAuthFailure(wrapErr("recover", err)) {
			return differs("it does not open the AES-GCM ciphertext sealed at load")
		}
		if err != nil {
			return wrapErr("recover", err)
		}
		if !bytes.Equal(pt, recoveryCheckPlain) {
			return differs("it opens the AES-GCM ciphertext sealed at load to another plaintext")
		}
	}
	return nil
}

// signsFor reports whether the private key key signs a random message so
// that it verifies under old's public key.
func signsFor(m Module, s pkcs11.SessionHandle, spec kindSpec, key pkcs11.ObjectHandle, old rootKey) (bool, error) {
	msg := make([]byte, 32)
	if _, err := rand.Read(msg); err != nil {
		return false, err
	}
	if spec.kind == KindSigEd25519 {
		sig, err := signOn(m, s, key, []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmEdDSA, nil)}, msg)
		if err != nil {
			return false, err
		}
		pub, ok := old.pub.(ed25519.PublicKey)
		return ok && ed25519.Verify(pub, msg, sig), nil
	}
	digest := sha256.Sum256(msg)
	raw, err := signOn(m, s, key, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, digest[:])
	if err != nil {
		return false, err
	}
	sig, err := rawToDER(raw)
	if err != nil {
		return false, nil
	}
	pub, ok := old.pub.(*ecdsa.PublicKey)
	return ok && ecdsa.VerifyASN1(pub, digest[:], sig), nil
}

// swapIn makes what attempt found the HSM's sessions, slot and keys, in a
// new generation, and ends the outage st.
func (h *HSM) swapIn(r *recovered, st *fatalState, attempt int) {
	h.keysMu.Lock()
	if r.keys != nil {
		h.keys.Store(r.keys)
	}
	h.slot.Store(uint64(r.slot))
	h.gen.Add(1)
	h.keysMu.Unlock()
	down := make(chan struct{})
	h.down.Store(&down)
	h.release(r.sessions)
	took := time.Since(st.at)
	h.stats.mu.Lock()
	h.stats.recoveries++
	h.stats.last = took
	h.stats.mu.Unlock()
	h.log.LogAttrs(context.Background(), slog.LevelInfo, "hsm: recovered; the token is usable again",
		slog.String("token", h.cfg.TokenLabel), slog.Int("attempt", attempt), slog.Duration("down_for", took))
	h.fatal.Store(nil) // last: calls are admitted again
}
