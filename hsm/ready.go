package hsm

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// readyTTL is how long a successful readiness result is reused, so that
// frequent probes (the health watcher, load balancers, Kubernetes) ask the
// HSM at most about once a second; readyFailTTL is the same for a failure
// that did not make the HSM fatal (a lost session, a busy pool), short so
// that readiness comes back as soon as the HSM answers again.
const (
	readyTTL     = time.Second
	readyFailTTL = 100 * time.Millisecond
)

// readyProbeMsg is the message of the test HMAC a readiness probe computes.
var readyProbeMsg = []byte("hsmd/ready-probe")

// readyProbe is the state of the readiness probe; at most one runs at a
// time.
type readyProbe struct {
	mu      sync.Mutex
	running chan struct{} // closed when the running probe ends; nil if none runs
	started time.Time     // when the running probe started
	ended   time.Time     // when the last probe ended; zero if none has
	err     error         // the result of the last probe
	gen     uint64        // the HSM generation the last probe ran in
}

// fresh reports whether the last result may be reused in generation gen:
// results from before a recovery never are. The caller holds p.mu.
func (p *readyProbe) fresh(gen uint64) bool {
	if p.running != nil || p.ended.IsZero() || p.gen != gen {
		return false
	}
	ttl := readyTTL
	if p.err != nil {
		ttl = readyFailTTL
	}
	return time.Since(p.ended) < ttl
}

// Ready returns nil while the token is usable: the HSM is open, no fatal
// error has been seen, the token answers C_GetTokenInfo with its user PIN
// neither locked nor expired, and, once keys are loaded, a test HMAC with
// the lowest kdk version succeeds on a pooled session (which shows that the
// login and the loaded key handles are still good). For readiness probes.
//
// A success is reused for about a second and a failure for 100 ms, and at
// most one probe runs at a time: concurrent callers share it. A probe stuck
// in the module is never duplicated: callers wait for it at most until
// their ctx is done or CallTimeout after it started, then get a retryable
// ErrTimeout at once, and no new probe starts until it ends. Once a fatal
// error has been seen Ready fails at once, without reaching the module,
// until the HSM has recovered (then the next call probes afresh) or, for a
// permanent error, for good: the HSM must be closed and reopened.
func (h *HSM) Ready(ctx context.Context) error {
	select {
	case <-h.closed:
		return fmt.Errorf("hsm: ready: %w", ErrClosed)
	default:
	}
	if err := h.fatalErr("ready"); err != nil {
		return err
	}
	p := &h.ready
	p.mu.Lock()
	gen := h.gen.Load()
	if p.fresh(gen) {
		err := p.err
		p.mu.Unlock()
		return err
	}
	if p.running == nil {
		if err := h.enter("ready"); err != nil {
			p.mu.Unlock()
			return err
		}
		p.running, p.started = make(chan struct{}), time.Now()
		go h.runProbe(p.running, gen)
	}
	done, deadline := p.running, p.started.Add(h.cfg.CallTimeout)
	p.mu.Unlock()
	return h.awaitProbe(ctx, done, deadline)
}

// awaitProbe waits for the probe that closes done, until ctx is done or
// deadline, and returns its result.
func (h *HSM) awaitProbe(ctx context.Context, done <-chan struct{}, deadline time.Time) error {
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	select {
	case <-done:
	case <-ctx.Done():
		return ctxErr("ready", ErrTimeout, ctx.Err())
	}
	if err := h.fatalErr("ready"); err != nil {
		return err
	}
	h.ready.mu.Lock()
	defer h.ready.mu.Unlock()
	return h.ready.err
}

// runProbe runs one probe in generation gen, which owns one h.inflight
// count, records its result and closes done.
func (h *HSM) runProbe(done chan struct{}, gen uint64) {
	defer h.inflight.Done()
	err := h.probe(gen)
	p := &h.ready
	p.mu.Lock()
	p.running, p.ended, p.err, p.gen = nil, time.Now(), err, gen
	p.mu.Unlock()
	close(done)
}

// probe asks the token for its state (it must still be the token opened,
// its user PIN neither locked nor expired) and, if keys are loaded,
// computes a test HMAC. Fatal errors are recorded unless the HSM has
// recovered since the probe began (generation gen).
func (h *HSM) probe(gen uint64) error {
	note := func(err error) error {
		if h.gen.Load() != gen {
			return err
		}
		return h.noteFatal(err)
	}
	ti, err := h.mod.GetTokenInfo(h.slotID())
	if err != nil {
		return note(wrapErr("ready", err))
	}
	if err := h.checkTokenInfo(ti); err != nil {
		return note(&Error{Op: "ready", Class: ClassFatal, Err: err})
	}
	ks := h.keys.Load()
	if ks == nil {
		return nil
	}
	v := ks.lowest(KindKDK)
	if v == 0 {
		return nil // only during a ceremony on a token without a kdk
	}
	if _, err := h.PRF(context.Background(), v, readyProbeMsg); err != nil {
		return fmt.Errorf("hsm: ready: test HMAC with %s: %w", KeyLabel(KindKDK, v), err)
	}
	return nil
}

// checkTokenInfo returns a PKCS#11 error (wrapped, with the reason) if ti
// shows the token unusable: its user PIN locked (CKR_PIN_LOCKED,
// permanent), its user PIN to be changed (CKR_PIN_EXPIRED), or another
// token in the slot (CKR_TOKEN_NOT_RECOGNIZED).
func (h *HSM) checkTokenInfo(ti pkcs11.TokenInfo) error {
	switch {
	case ti.Flags&pkcs11.CKF_USER_PIN_LOCKED != 0:
		return fmt.Errorf("the user PIN is locked: %w", pkcs11.Error(pkcs11.CKR_PIN_LOCKED))
	case ti.Flags&pkcs11.CKF_USER_PIN_TO_BE_CHANGED != 0:
		return fmt.Errorf("the user PIN must be changed: %w", pkcs11.Error(pkcs11.CKR_PIN_EXPIRED))
	case ti.Label != h.cfg.TokenLabel || ti.SerialNumber != h.serial:
		return fmt.Errorf("the slot holds token %q with serial number %q, not %q with %q: %w",
			ti.Label, ti.SerialNumber, h.cfg.TokenLabel, h.serial, pkcs11.Error(pkcs11.CKR_TOKEN_NOT_RECOGNIZED))
	}
	return nil
}
