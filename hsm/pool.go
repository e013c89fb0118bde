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
	if f := h.fatal.Load(); f != nil {
		return fmt.Errorf("hsm: %s: token unusable: %w", op, f.err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return fmt.Errorf("hsm: %s: %w", op, ErrClosed)
	}
	h.inflight.Add(1)
	return nil
}

// call runs fn under the deadline of ctx and CallTimeout, without a pooled
// session. fn runs in its own goroutine and always runs to completion.
func (h *HSM) call(ctx context.Context, op string, fn func() error) error {
	if err := h.enter(op); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, h.cfg.CallTimeout)
	defer cancel()
	return h.await(ctx, op, fn)
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
	if err := h.enter(op); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, h.cfg.CallTimeout)
	defer cancel()
	var s pkcs11.SessionHandle
	select {
	case s = <-h.pool:
	case <-h.closed:
		h.inflight.Done()
		return fmt.Errorf("hsm: %s: %w", op, ErrClosed)
	case <-ctx.Done():
		h.inflight.Done()
		return ctxErr(op, ErrBusy, ctx.Err())
	}
	return h.await(ctx, op, func() error { return h.run(op, s, fn) })
}

// run executes fn on s (opening a session first if s is 0), classifies the
// error, repairs the session if needed and returns it to the pool.
func (h *HSM) run(op string, s pkcs11.SessionHandle, fn sessionFunc) (err error) {
	defer func() {
		h.pool <- s // never blocks: at most cap(h.pool) sessions exist
	}()
	if s == 0 {
		if s, err = h.openSession(); err != nil {
			s = 0
			return h.noteFatal(err)
		}
	}
	err = wrapErr(op, fn(h.mod, s))
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return err
	}
	if rv == pkcs11.CKR_USER_NOT_LOGGED_IN {
		if lerr := h.relogin(s); lerr != nil {
			return h.noteFatal(&Error{Op: op, Class: ClassFatal, Err: lerr})
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
