package localstate

import (
	"context"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/hsmd/hsmd/store"
)

// RollbackError: the store is bound to an older counter value than the
// TPM's: the data directory was restored from an earlier copy.
type RollbackError struct{ Store, TPM uint64 }

func (e *RollbackError) Error() string {
	return fmt.Sprintf("localstate: rollback: the data directory is bound to rollback counter %d, the TPM's counter is at %d: it was restored from an older copy", e.Store, e.TPM)
}

// AheadError: the store is bound to a counter value more than one ahead of
// the TPM's: the TPM was cleared or replaced, or the data directory comes
// from another machine.
type AheadError struct{ Store, TPM uint64 }

func (e *AheadError) Error() string {
	return fmt.Sprintf("localstate: the data directory is bound to rollback counter %d, ahead of the TPM's %d: the TPM was cleared or replaced, or the directory comes from another machine", e.Store, e.TPM)
}

// Check verifies st (an error wrapping store.ErrTampered names what was
// edited) and compares its counter with the TPM's. A store exactly one
// ahead is an advance that a crash interrupted between its two phases:
// Check completes it. It returns the counter value now in force, or a
// *RollbackError or *AheadError naming both values.
func Check(ctx context.Context, t TPM, st store.Sealed) (uint64, error) {
	state, err := st.Verify(ctx)
	if err != nil {
		return 0, err
	}
	n, err := t.ReadCounter(ctx)
	if err != nil {
		return 0, fmt.Errorf("localstate: read the rollback counter: %w", err)
	}
	switch {
	case state.Counter == n:
		return n, nil
	case state.Counter == n+1:
		m, err := t.IncrementCounter(ctx)
		if err != nil {
			return 0, fmt.Errorf("localstate: complete an interrupted counter advance: %w", err)
		}
		if m != state.Counter {
			return 0, &AheadError{Store: state.Counter, TPM: m}
		}
		return m, nil
	case state.Counter < n:
		return 0, &RollbackError{Store: state.Counter, TPM: n}
	}
	return 0, &AheadError{Store: state.Counter, TPM: n}
}

// AdoptCounter makes the TPM's counter and the store's agree by moving the
// lower one up, defining the counter if needed. It trusts both: it is for
// the in-process simulator, whose NV memory does not outlive the process,
// and gives no rollback protection across restarts.
func AdoptCounter(ctx context.Context, t TPM, st store.Sealed) (uint64, error) {
	state, err := st.Verify(ctx)
	if err != nil {
		return 0, err
	}
	n, err := defineOrAdopt(ctx, t)
	if err != nil {
		return 0, err
	}
	for n < state.Counter {
		if n, err = t.IncrementCounter(ctx); err != nil {
			return 0, err
		}
	}
	if n > state.Counter {
		err = st.SetCounter(ctx, n)
	}
	return n, err
}

// Counter advances the rollback counter on state-changing events, in two
// phases: the store is bound to the next value first, then the TPM counter
// is incremented, so that a crash in between leaves the store one ahead,
// which Check completes, and never behind, which would look like a
// rollback. Advances are rate-bounded to spare the TPM's NV memory. A
// Counter is safe for concurrent use.
type Counter struct {
	// OnBind, if set, runs before the store is bound to a new value next
	// (so before the TPM moves to it): the daemon binds its audit log's
	// anchor there. Its error stops the advance. Set it before the first
	// Advance.
	OnBind func(ctx context.Context, next uint64) error

	t   TPM
	st  store.Sealed
	lim *rate.Limiter
	mu  sync.Mutex
	cur uint64
}

// Default rate of advances: a burst of 100, then one every 6 seconds (at
// most 600 an hour, about 5 million a year if sustained; hsmd's events are
// far rarer: see docs/SECURITY.md on NV wear).
const (
	DefaultAdvanceBurst = 100
	DefaultAdvanceEvery = 6
)

// NewCounter returns a Counter at value cur (as Check returned it).
func NewCounter(t TPM, st store.Sealed, cur uint64) *Counter {
	return &Counter{t: t, st: st, cur: cur, lim: rate.NewLimiter(rate.Limit(1.0/DefaultAdvanceEvery), DefaultAdvanceBurst)}
}

// Value returns the counter value in force.
func (c *Counter) Value() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

// AdvanceTimeout bounds one Advance, whatever its caller's context: an
// advance that a caller's cancellation cut between the TPM increment and
// its reply would leave the TPM ahead of the store.
const AdvanceTimeout = 2 * time.Minute

// Advance moves the counter one step, waiting for the rate bound, and
// returns the new value. It runs detached from ctx's cancellation (bounded
// by AdvanceTimeout). If the TPM's counter ends up ahead of what Advance
// expected (an increment whose reply was lost, or another program moving
// it), the store is bound to the TPM's value, so the store never stays
// behind the TPM while hsmd runs. On error the store may be one ahead of
// the TPM, which the next Check completes.
func (c *Counter) Advance(ctx context.Context) (uint64, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), AdvanceTimeout)
	defer cancel()
	if err := c.lim.Wait(ctx); err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	next := c.cur + 1
	if err := c.bind(ctx, next); err != nil {
		return 0, err
	}
	if err := c.st.SetCounter(ctx, next); err != nil {
		return 0, fmt.Errorf("localstate: bind the store to counter %d: %w", next, err)
	}
	m, err := c.t.IncrementCounter(ctx)
	if err != nil || m != next {
		return c.catchUp(ctx, next, err)
	}
	c.cur = next
	return next, nil
}

func (c *Counter) bind(ctx context.Context, next uint64) error {
	if c.OnBind == nil {
		return nil
	}
	if err := c.OnBind(ctx, next); err != nil {
		return fmt.Errorf("localstate: bind to counter %d: %w", next, err)
	}
	return nil
}

// catchUp reads the TPM's counter after an increment that failed or
// returned another value than next, and binds the store to it if it is
// ahead.
func (c *Counter) catchUp(ctx context.Context, next uint64, incErr error) (uint64, error) {
	m, err := c.t.ReadCounter(ctx)
	if err != nil {
		return 0, fmt.Errorf("localstate: increment the rollback counter: %w (and reading it back: %w)", incErr, err)
	}
	switch {
	case m == next:
		c.cur = next
		return next, nil
	case m > next:
		if err := c.bind(ctx, m); err != nil {
			return 0, err
		}
		if err := c.st.SetCounter(ctx, m); err != nil {
			return 0, fmt.Errorf("localstate: bind the store to the TPM's counter %d: %w", m, err)
		}
		c.cur = m
		return m, nil
	}
	// The TPM is at next-1: the increment did not happen; the store is one
	// ahead, which the next Advance or Check completes.
	return 0, fmt.Errorf("localstate: increment the rollback counter: %w", incErr)
}
