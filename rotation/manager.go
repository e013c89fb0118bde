package rotation

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	mathrand "math/rand/v2"
	"slices"
	"time"

	"github.com/hsmd/hsmd/store"
)

// Operations named in Change.Op.
const (
	OpRotate          = "rotate"
	OpDisable         = "disable"
	OpEnable          = "enable"
	OpScheduleDestroy = "schedule_destroy"
	OpCancelDestroy   = "cancel_destroy"
	OpSetPolicy       = "set_policy"
	OpShred           = "shred"
	OpDestroy         = "destroy" // by the Scheduler, at DestroyTime
)

// DefaultRetries is how many times a Manager tries an update that keeps
// losing compare-and-swap races when Manager.Retries is zero.
const DefaultRetries = 16

// NoMinDestroyWait, as Manager.MinDestroyWait, accepts any non-negative
// destruction waiting period (the daemon's --dev profile).
const NoMinDestroyWait time.Duration = -1

// Failpoint, if set, is called with a name at each step below, so that a
// crash test can stop the process there (for example by exiting when the
// name matches an environment variable) and then check the store's
// invariants. Nil means no failpoints. Set it before any Manager or
// Scheduler runs; it may be called concurrently.
//
//	rotate/before-commit  a rotation is computed, not yet written
//	rotate/after-commit   a rotation is written, OnChange/OnBatch not yet run
//	destroy/after-commit  a destruction is written (salts erased),
//	                      OnChange/OnBatch not yet run
//	shred/before-delete   the tenant is read, not yet deleted
//	shred/after-delete    the tenant is deleted, OnChange not yet run
//
// A Scheduler batch fires rotate/* when it holds a rotation and
// destroy/after-commit when it holds a destruction. Manager operations fire
// destroy/after-commit when they commit a destruction that had fallen due
// (see Manager).
var Failpoint func(name string)

func failpoint(name string) {
	if f := Failpoint; f != nil {
		f(name)
	}
}

// Change describes one committed change to one tenant.
type Change struct {
	Op       string // one of the Op constants
	Tenant   string
	TenantID uint64
	// Versions whose state or ability to decrypt changed, or that were
	// created, in order; every version of the tenant for OpShred.
	Versions []uint32
}

// Manager applies one operation to one tenant in the store: it reads the
// tenant, applies a pure transition of this package, and writes it back
// with UpdateTenant, re-reading and retrying when it loses a race
// (store.ErrConflict). Before every operation it also destroys the
// tenant's versions whose destruction has fallen due (DestroyDue), so that
// a destruction is final at its DestroyTime even if the Scheduler has not
// run yet; those versions are committed with the operation, or not at all
// if the operation is refused.
//
// The zero value of each field but Store selects its default. Set the
// fields before the first call and do not change them after; a Manager is
// then safe for concurrent use.
type Manager struct {
	Store store.Store
	// Now returns the current time; default time.Now.
	Now func() time.Time
	// Rand is the source of new salts; default crypto/rand.Reader.
	Rand io.Reader
	// KDKVersion returns the newest kdk version, from which new key
	// versions derive; default 1.
	KDKVersion func() uint32
	// MinDestroyWait is the shortest destruction waiting period accepted;
	// 0 means the constant MinDestroyWait, NoMinDestroyWait (or any
	// negative value) no minimum.
	MinDestroyWait time.Duration
	// Retries bounds the attempts of an update that loses races; default
	// DefaultRetries.
	Retries int
	// OnChange, if set, runs after each committed change (the daemon
	// advances the TPM rollback counter and drops the cached data keys of
	// the changed versions). Its error is returned along with the committed
	// tenant: the change stays committed.
	OnChange func(ctx context.Context, c Change) error
}

func (m *Manager) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

func (m *Manager) rand() io.Reader {
	if m.Rand != nil {
		return m.Rand
	}
	return rand.Reader
}

func (m *Manager) kdk() uint32 {
	if m.KDKVersion != nil {
		return m.KDKVersion()
	}
	return 1
}

func (m *Manager) minWait() time.Duration {
	switch {
	case m.MinDestroyWait == 0:
		return MinDestroyWait
	case m.MinDestroyWait < 0:
		return 0
	}
	return m.MinDestroyWait
}

func (m *Manager) retries() int {
	if m.Retries > 0 {
		return m.Retries
	}
	return DefaultRetries
}

// Rotate makes a new current key version for the tenant named name (see the
// function Rotate) and returns the committed tenant. Errors: those of the
// store (store.ErrNotFound, store.ErrConflict once the retries are spent,
// ...), of Rotate, ctx.Err(), or OnChange's (the tenant is then committed
// and returned too).
func (m *Manager) Rotate(ctx context.Context, name string) (*store.Tenant, error) {
	kdk := m.kdk()
	return m.do(ctx, OpRotate, name, func(t *store.Tenant, now time.Time) error {
		_, err := Rotate(t, kdk, now, m.rand())
		return err
	})
}

// Disable disables version v of the tenant named name (see the function
// Disable). Errors as for Manager.Rotate, and those of Disable.
func (m *Manager) Disable(ctx context.Context, name string, v uint32) (*store.Tenant, error) {
	return m.do(ctx, OpDisable, name, func(t *store.Tenant, _ time.Time) error { return Disable(t, v) })
}

// Enable enables version v of the tenant named name (see the function
// Enable). Errors as for Manager.Rotate, and those of Enable.
func (m *Manager) Enable(ctx context.Context, name string, v uint32) (*store.Tenant, error) {
	return m.do(ctx, OpEnable, name, func(t *store.Tenant, _ time.Time) error { return Enable(t, v) })
}

// CancelDestroy cancels the scheduled destruction of version v of the
// tenant named name (see the function CancelDestroy); it fails with
// ErrTransition once the DestroyTime has passed. Errors as for
// Manager.Rotate, and those of CancelDestroy.
func (m *Manager) CancelDestroy(ctx context.Context, name string, v uint32) (*store.Tenant, error) {
	return m.do(ctx, OpCancelDestroy, name, func(t *store.Tenant, _ time.Time) error { return CancelDestroy(t, v) })
}

// ScheduleDestroy schedules version v of the tenant named name for
// destruction after wait (0: DefaultDestroyWait), refusing a wait below the
// Manager's minimum with ErrWaitTooShort (see the function ScheduleDestroy).
// Errors as for Manager.Rotate, and those of ScheduleDestroy.
func (m *Manager) ScheduleDestroy(ctx context.Context, name string, v uint32, wait time.Duration) (*store.Tenant, error) {
	if wait == 0 {
		wait = DefaultDestroyWait
	}
	minWait := m.minWait()
	return m.do(ctx, OpScheduleDestroy, name, func(t *store.Tenant, now time.Time) error {
		return ScheduleDestroy(t, v, now, wait, minWait)
	})
}

// CheckScheduleDestroy reports whether ScheduleDestroy with the same
// arguments would be accepted now, changing nothing: callers that must
// spend something first (a quorum approval) check before spending.
func (m *Manager) CheckScheduleDestroy(ctx context.Context, name string, v uint32, wait time.Duration) error {
	if wait == 0 {
		wait = DefaultDestroyWait
	}
	t, err := m.Store.GetTenant(ctx, name)
	if err != nil {
		return fmt.Errorf("rotation: %s tenant %q: %w", OpScheduleDestroy, name, err)
	}
	now := m.now()
	DestroyDue(t, now)
	return ScheduleDestroy(t, v, now, wait, m.minWait())
}

// SetPolicy replaces the policy of the tenant named name (see the function
// SetPolicy). Errors as for Manager.Rotate, and ErrPolicy.
func (m *Manager) SetPolicy(ctx context.Context, name string, p store.Policy) (*store.Tenant, error) {
	return m.do(ctx, OpSetPolicy, name, func(t *store.Tenant, _ time.Time) error { return SetPolicy(t, p) })
}

// do runs one public operation: apply, then the failpoints and OnChange.
func (m *Manager) do(ctx context.Context, op, name string, fn func(*store.Tenant, time.Time) error) (*store.Tenant, error) {
	r, err := m.apply(ctx, op, name, m.now, fn)
	if err != nil {
		return nil, err
	}
	if !r.written {
		return r.t, nil
	}
	if op == OpRotate {
		failpoint("rotate/after-commit")
	}
	if len(r.destroyed) > 0 {
		failpoint("destroy/after-commit")
	}
	if m.OnChange != nil {
		c := Change{Op: op, Tenant: r.t.Name, TenantID: r.t.ID, Versions: r.changed}
		if err := m.OnChange(ctx, c); err != nil {
			return r.t, fmt.Errorf("rotation: %s tenant %q: committed, but: %w", op, name, err)
		}
	}
	return r.t, nil
}

// result is what apply committed.
type result struct {
	t         *store.Tenant
	written   bool     // false: nothing changed, nothing written
	changed   []uint32 // see Change.Versions
	destroyed []uint32 // by DestroyDue
}

// apply reads the tenant, destroys its due versions, runs fn and writes the
// tenant back if anything changed, retrying from the read on
// store.ErrConflict. fn must be a pure transition. It writes nothing if fn
// fails.
func (m *Manager) apply(ctx context.Context, op, name string, now func() time.Time, fn func(*store.Tenant, time.Time) error) (result, error) {
	for attempt := 1; ; attempt++ {
		t, err := m.Store.GetTenant(ctx, name)
		if err != nil {
			return result{}, fmt.Errorf("rotation: %s tenant %q: %w", op, name, err)
		}
		before := snapshot(t)
		at := now()
		r := result{t: t, destroyed: DestroyDue(t, at)}
		if err := fn(t, at); err != nil {
			return result{}, err
		}
		r.changed = diff(before, t)
		if len(r.changed) == 0 && before.policy == t.Policy {
			return r, nil
		}
		if op == OpRotate {
			failpoint("rotate/before-commit")
		}
		err = m.Store.UpdateTenant(ctx, t)
		if err == nil {
			r.written = true
			return r, nil
		}
		if !errors.Is(err, store.ErrConflict) || attempt >= m.retries() {
			return result{}, fmt.Errorf("rotation: %s tenant %q (attempt %d): %w", op, name, attempt, err)
		}
		if err := backoff(ctx, attempt); err != nil {
			return result{}, fmt.Errorf("rotation: %s tenant %q: %w", op, name, err)
		}
	}
}

// backoff sleeps a random time that grows with attempt (at most ~10ms), or
// returns ctx.Err().
func backoff(ctx context.Context, attempt int) error {
	d := time.Duration(mathrand.Int64N(int64(min(attempt, 10)) * int64(time.Millisecond)))
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}

// state is what Change.Versions compares for one version.
type state struct {
	state   store.KeyState
	decrypt bool
}

type before struct {
	versions map[uint32]state
	policy   store.Policy
}

func snapshot(t *store.Tenant) before {
	b := before{versions: make(map[uint32]state, len(t.Versions)), policy: t.Policy}
	for _, kv := range t.Versions {
		b.versions[kv.Version] = state{kv.State, CanDecrypt(t, kv.Version) == nil}
	}
	return b
}

// diff returns the versions of t that are new since b, or whose state or
// ability to decrypt changed, in order.
func diff(b before, t *store.Tenant) []uint32 {
	var out []uint32
	for _, kv := range t.Versions {
		old, ok := b.versions[kv.Version]
		if !ok || old != (state{kv.State, CanDecrypt(t, kv.Version) == nil}) {
			out = append(out, kv.Version)
		}
	}
	return out
}

// Shred deletes the tenant named name from the store (crypto-shredding: see
// store.Store.DeleteTenant), retrying on store.ErrConflict, then runs
// OnChange with every version the tenant had. Errors: store.ErrNotFound if
// there is no such tenant, the store's other errors, ctx.Err(), or
// OnChange's (the tenant is then gone all the same).
func (m *Manager) Shred(ctx context.Context, name string) error {
	for attempt := 1; ; attempt++ {
		t, err := m.Store.GetTenant(ctx, name)
		if err != nil {
			return fmt.Errorf("rotation: shred tenant %q: %w", name, err)
		}
		failpoint("shred/before-delete")
		err = m.Store.DeleteTenant(ctx, name, t.Revision)
		if err == nil {
			failpoint("shred/after-delete")
			return m.shredded(ctx, t)
		}
		if !errors.Is(err, store.ErrConflict) || attempt >= m.retries() {
			return fmt.Errorf("rotation: shred tenant %q (attempt %d): %w", name, attempt, err)
		}
		if err := backoff(ctx, attempt); err != nil {
			return fmt.Errorf("rotation: shred tenant %q: %w", name, err)
		}
	}
}

// shredded erases the salts of the deleted tenant's copy in memory and runs
// OnChange.
func (m *Manager) shredded(ctx context.Context, t *store.Tenant) error {
	c := Change{Op: OpShred, Tenant: t.Name, TenantID: t.ID}
	for i := range t.Versions {
		clear(t.Versions[i].Salt)
		c.Versions = append(c.Versions, t.Versions[i].Version)
	}
	slices.Sort(c.Versions)
	if m.OnChange == nil {
		return nil
	}
	if err := m.OnChange(ctx, c); err != nil {
		return fmt.Errorf("rotation: shred tenant %q: deleted, but: %w", t.Name, err)
	}
	return nil
}
