package hsm

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// readyTTL is how long a readiness result is reused, so that frequent
// probes (the health watcher, load balancers, Kubernetes) ask the HSM at
// most about once a second.
const readyTTL = time.Second

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
}

// Ready returns nil while the token is usable: the HSM is open, no fatal
// error has been seen, the token answers C_GetTokenInfo with its user PIN
// neither locked nor expired, and, once keys are loaded, a test HMAC with
// the lowest kdk version succeeds on a pooled session (which shows that the
// login and the loaded key handles are still good). For readiness probes.
//
// A result is reused for about a second, and at most one probe runs at a
// time: concurrent callers share it. A probe stuck in the module is never
// duplicated: callers wait for it at most until their ctx is done or
// CallTimeout after it started, then get a retryable ErrTimeout at once,
// and no new probe starts until it ends. Once a fatal error has been seen
// Ready keeps failing; the HSM must be closed and reopened.
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
	if p.running == nil && !p.ended.IsZero() && time.Since(p.ended) < readyTTL {
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
		go h.runProbe(p.running)
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

// runProbe runs one probe, which owns one h.inflight count, records its
// result and closes done.
func (h *HSM) runProbe(done chan struct{}) {
	defer h.inflight.Done()
	err := h.probe()
	p := &h.ready
	p.mu.Lock()
	p.running, p.ended, p.err = nil, time.Now(), err
	p.mu.Unlock()
	close(done)
}

// probe asks the token for its state and, if keys are loaded, computes a
// test HMAC. Fatal errors are recorded.
func (h *HSM) probe() error {
	ti, err := h.mod.GetTokenInfo(h.slot)
	if err != nil {
		return h.noteFatal(wrapErr("ready", err))
	}
	if ti.Flags&(pkcs11.CKF_USER_PIN_LOCKED|pkcs11.CKF_USER_PIN_TO_BE_CHANGED) != 0 {
		return h.noteFatal(&Error{Op: "ready", Class: ClassFatal,
			Err: pkcs11.Error(pkcs11.CKR_PIN_LOCKED)})
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
