package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// sessionFunc is one HSM operation on a pooled session.
type sessionFunc func(m Module, s pkcs11.SessionHandle) error

// enter admits a call: it fails once the HSM is closed or has seen a fatal
// error, and otherwise counts the call as in flight. The caller must make
// sure h.inflight.Done is called exactly once.
func (h *HSM) enter(op string) error {
	if err := h.fatalErr(op); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return fmt.Errorf("hsm: %s: %w", op, ErrClosed)
	}
	h.inflight.Add(1)
	return nil
}

// fatalErr returns an error wrapping the recorded fatal error, or nil if
// none has been seen (or the HSM has recovered since).
func (h *HSM) fatalErr(op string) error {
	f := h.fatal.Load()
	switch {
	case f == nil:
		return nil
	case !f.recoverable:
		return fmt.Errorf("hsm: %s: token unusable (an operator must act, then reopen the HSM): %w", op, f.err)
	case f.last != nil:
		return fmt.Errorf("hsm: %s: token unusable (recovering, %d attempts failed, the last with: %v): %w", op, f.attempts, f.last, f.err)
	}
	return fmt.Errorf("hsm: %s: token unusable (recovering): %w", op, f.err)
}

// await runs fn in a goroutine that owns one h.inflight count, and waits
// for it until ctx is done.
func (h *HSM) await(ctx context.Context, op string, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		defer h.inflight.Done()
		done <- fn()
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctxErr(op, ErrTimeout, ctx.Err())
	}
}

// do runs fn on a pooled session under the deadline of ctx and
// CallTimeout. Waiting for a session past the deadline gives ErrBusy; fn
// running past it gives ErrTimeout, and the session returns to the pool
// when fn has finished. Errors are classified (see Class); a session-level
// error replaces the session; a fatal error makes Ready fail.
func (h *HSM) do(ctx context.Context, op string, fn sessionFunc) error {
	return h.doAt(ctx, op, anyGen, fn)
}

// doAt is do for fn using object handles of generation gen (see objRef):
// if the HSM has recovered since, fn does not run and the call fails with
// a retryable error.
func (h *HSM) doAt(ctx context.Context, op string, gen uint64, fn sessionFunc) error {
	if err := h.enter(op); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, h.cfg.CallTimeout)
	defer cancel()
	s, err := h.take(ctx, op)
	if err != nil {
		h.inflight.Done()
		return err
	}
	return h.await(ctx, op, func() error { return h.run(op, s, gen, fn) })
}

// take waits for a pooled session until ctx is done. It checks ctx before
// and after waiting: select picks at random among ready cases, so a caller
// whose deadline has passed could otherwise still get a free session and
// start HSM work it has already given up on.
func (h *HSM) take(ctx context.Context, op string) (pkcs11.SessionHandle, error) {
	if err := ctx.Err(); err != nil {
		return 0, ctxErr(op, ErrBusy, err)
	}
	down := *h.down.Load()
	select {
	case <-down:
		// Recovery holds the sessions: fail fast rather than wait.
		if err := h.fatalErr(op); err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("hsm: %s: %w (the token recovered meanwhile)", op, ErrBusy)
	case s := <-h.pool:
		if err := ctx.Err(); err != nil {
			h.pool <- s // never blocks: we just took it
			return 0, ctxErr(op, ErrBusy, err)
		}
		return s, nil
	case <-h.closed:
		return 0, fmt.Errorf("hsm: %s: %w", op, ErrClosed)
	case <-ctx.Done():
		return 0, ctxErr(op, ErrBusy, ctx.Err())
	}
}

// run executes fn on s (opening a session first if s is 0), classifies the
// error, repairs the session if needed and returns it to the pool. Handles
// of generation gen are stale if the HSM recovered since (recovery holds
// every session while it swaps them, so holding s, the generation cannot
// change under fn).
func (h *HSM) run(op string, s pkcs11.SessionHandle, gen uint64, fn sessionFunc) (err error) {
	defer func() {
		h.pool <- s // never blocks: at most cap(h.pool) sessions exist
	}()
	if err := h.fatalErr(op); err != nil {
		return err // went fatal while this call waited for the session
	}
	if gen != anyGen && gen != h.gen.Load() {
		return fmt.Errorf("hsm: %s: %w", op, errStaleHandles)
	}
	if s == 0 {
		if s, err = h.openSession(); err != nil {
			s = 0
			return h.noteFatal(err)
		}
	}
	logins := h.loginGen.Load() // before fn, so a re-login during fn counts
	err = wrapErr(op, fn(h.mod, s))
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return err
	}
	if rv == pkcs11.CKR_USER_NOT_LOGGED_IN {
		if lerr := h.relogin(op, s, logins); lerr != nil {
			return lerr
		}
		return &Error{Op: op, Class: ClassRetryable, Err: rv}
	}
	if replacesSession(rv) {
		s = h.replaceSession(s)
	}
	return h.noteFatal(err)
}

// replaceSession opens a fresh session before closing the bad one (so the
// login, which lives as long as any session, is kept). If no session can be
// opened it returns 0 and the next user of the slot tries again.
func (h *HSM) replaceSession(bad pkcs11.SessionHandle) pkcs11.SessionHandle {
	s, err := h.openSession()
	if err != nil {
		s = 0
	}
	_ = h.mod.CloseSession(bad) // may fail: the session is likely gone already
	return s
}

// ctxErr reports a deadline as kind (ErrBusy or ErrTimeout, both
// retryable) and a cancellation as itself.
func ctxErr(op string, kind, ctxErr error) error {
	if errors.Is(ctxErr, context.DeadlineExceeded) {
		return fmt.Errorf("hsm: %s: %w (%w)", op, kind, ctxErr)
	}
	return fmt.Errorf("hsm: %s: %w", op, ctxErr)
}
