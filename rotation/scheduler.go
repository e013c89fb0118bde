package rotation

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/hsmd/hsmd/store"
)

// Scheduler defaults.
const (
	DefaultInterval = time.Minute
	DefaultBatch    = 500
	DefaultRate     = rate.Limit(1000)
	DefaultJitter   = time.Hour
)

// opScheduled names the Scheduler's one-by-one updates in errors.
const opScheduled = "scheduled update of"

// maxPassErrors bounds the errors a pass keeps (Stats.Failed counts all).
const maxPassErrors = 10

// Scheduler rotates the tenants that are due and destroys the key versions
// whose destruction is due. Due-ness is computed from the store at each
// pass, so a restarted Scheduler resumes where the last one stopped and
// never repeats a committed rotation.
//
// The zero value of each field but Manager selects its default. Set the
// fields before the first call and do not change them after. RunOnce and
// Run may be called from several goroutines; passes then run one at a
// time.
type Scheduler struct {
	// Manager provides the store, the clock, the random source and the kdk
	// version, and retries a batch's tenants one by one after a conflict.
	// Its OnChange is not called: OnBatch is.
	Manager *Manager
	// Interval is the time between the starts of two passes of Run;
	// default DefaultInterval.
	Interval time.Duration
	// Batch is the number of tenants read per page and written per store
	// transaction; default DefaultBatch.
	Batch int
	// Rate bounds the tenants changed per second, across passes; default
	// DefaultRate. rate.Inf lifts the bound (tests, benchmarks).
	Rate rate.Limit
	// Jitter spreads automatic rotations: a tenant is rotated at its due
	// time (NextRotation) plus a delay in [0, Jitter) derived from its ID
	// alone, so that a restart does not change it. Default DefaultJitter;
	// negative means none.
	Jitter time.Duration
	// OnBatch, if set, runs after each committed batch with its changes
	// (the daemon advances the rollback counter once per batch and drops
	// cached data keys). If it fails, the pass stops and returns its error;
	// the batch stays committed.
	OnBatch func(ctx context.Context, changes []Change) error
	// OnPass, if set, is called by Run after each pass with its result (the
	// daemon logs and counts them). The Scheduler logs nothing itself.
	OnPass func(Stats, error)

	mu      sync.Mutex // serialises passes; guards limiter
	limiter *rate.Limiter
}

// Stats counts what a pass did.
type Stats struct {
	Scanned   int // tenants read
	Rotated   int // tenants rotated
	Destroyed int // key versions destroyed
	Failed    int // tenants that could not be handled (see the pass's error)
}

func (s *Scheduler) batch() int {
	if s.Batch > 0 {
		return s.Batch
	}
	return DefaultBatch
}

func (s *Scheduler) jitter() time.Duration {
	switch {
	case s.Jitter == 0:
		return DefaultJitter
	case s.Jitter < 0:
		return 0
	}
	return s.Jitter
}

// NextRotation returns when the Scheduler rotates t: NextRotation(t) plus
// t's jitter, or false if t's policy never rotates. It does not depend on
// the process: the jitter is a function of t.ID and Jitter.
func (s *Scheduler) NextRotation(t *store.Tenant) (time.Time, bool) {
	next, ok := NextRotation(t)
	if !ok {
		return next, false
	}
	j := s.jitter()
	if j <= 0 {
		return next, true
	}
	return next.Add(time.Duration(mix(t.ID) % uint64(j))), true
}

// mix is the SplitMix64 finaliser: IDs are random already, but tests and
// imports may use small ones.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// due reports whether the Scheduler rotates t at now.
func (s *Scheduler) due(t *store.Tenant, now time.Time) bool {
	next, ok := s.NextRotation(t)
	return ok && !next.After(now)
}

// RunOnce makes one pass over every tenant, in name order and in pages of
// Batch: it destroys the versions due at the Manager's Now (DestroyDue) and
// rotates the tenants due then (Scheduler.NextRotation), and commits each
// page's changed tenants in one UpdateTenants transaction, at most Rate
// tenants a second, then calls OnBatch. If that transaction fails on a
// conflict, a vanished or an invalid tenant, the page's tenants are
// retried one by one through the Manager, each re-read and re-checked.
//
// A tenant that cannot be handled is counted in Stats.Failed and the pass
// goes on; the returned error joins the first few such errors. The pass
// stops early, returning what it did so far, on ctx's end, a failure to
// list tenants or write a batch, or an OnBatch error.
func (s *Scheduler) RunOnce(ctx context.Context) (Stats, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.limiter == nil {
		r := s.Rate
		if r <= 0 {
			r = DefaultRate
		}
		s.limiter = rate.NewLimiter(r, s.batch())
	}
	p := pass{s: s, now: s.Manager.now(), kdk: s.Manager.kdk()}
	after := ""
	for {
		page, err := s.Manager.Store.ListTenants(ctx, after, s.batch())
		if err != nil {
			return p.stats, p.stop(fmt.Errorf("rotation: list tenants after %q: %w", after, err))
		}
		if len(page) == 0 {
			return p.stats, p.stop(nil)
		}
		after = page[len(page)-1].Name
		if err := p.page(ctx, page); err != nil {
			return p.stats, p.stop(err)
		}
	}
}

// Run calls RunOnce now and then every Interval until ctx is done, passing
// each result to OnPass.
func (s *Scheduler) Run(ctx context.Context) {
	interval := s.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		st, err := s.RunOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if s.OnPass != nil {
			s.OnPass(st, err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// pass is the state of one RunOnce.
type pass struct {
	s     *Scheduler
	now   time.Time
	kdk   uint32
	stats Stats
	errs  []error
}

func (p *pass) fail(err error) {
	p.stats.Failed++
	if len(p.errs) < maxPassErrors {
		p.errs = append(p.errs, err)
	}
}

// stop returns the pass's error: err joined with the tenants' failures.
func (p *pass) stop(err error) error {
	if err != nil {
		p.errs = append(p.errs, err)
	}
	return errors.Join(p.errs...)
}

// plan applies to t (in memory) what is due at p.now and returns the
// changes made; t is unchanged if there are none.
func (p *pass) plan(t *store.Tenant) ([]Change, error) {
	var out []Change
	if d := DestroyDue(t, p.now); len(d) > 0 {
		out = append(out, Change{Op: OpDestroy, Tenant: t.Name, TenantID: t.ID, Versions: d})
	}
	if p.s.due(t, p.now) {
		v, err := Rotate(t, p.kdk, p.now, p.s.Manager.rand())
		if err != nil {
			return out, err
		}
		out = append(out, Change{Op: OpRotate, Tenant: t.Name, TenantID: t.ID, Versions: []uint32{v}})
	}
	return out, nil
}

// page handles one page of tenants.
func (p *pass) page(ctx context.Context, page []*store.Tenant) error {
	var batch []*store.Tenant
	var changes []Change
	for _, t := range page {
		p.stats.Scanned++
		c, err := p.plan(t)
		if err != nil {
			p.fail(err) // a destruction planned before the failure still goes
		}
		if len(c) > 0 {
			batch, changes = append(batch, t), append(changes, c...)
		}
	}
	if len(batch) == 0 {
		return nil
	}
	if err := p.s.limiter.WaitN(ctx, len(batch)); err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	changes, err := p.commit(ctx, batch, changes)
	if err != nil {
		return err
	}
	return p.committed(ctx, changes)
}

// commit writes the batch in one transaction, or one by one after a
// conflict, and returns the changes committed.
func (p *pass) commit(ctx context.Context, batch []*store.Tenant, changes []Change) ([]Change, error) {
	if hasOp(changes, OpRotate) {
		failpoint("rotate/before-commit")
	}
	err := p.s.Manager.Store.UpdateTenants(ctx, batch)
	switch {
	case err == nil:
		return changes, nil
	case ctx.Err() != nil:
		return nil, ctx.Err()
	case errors.Is(err, store.ErrConflict), errors.Is(err, store.ErrNotFound), errors.Is(err, store.ErrInvalid):
		return p.oneByOne(ctx, batch), nil
	}
	return nil, fmt.Errorf("rotation: write a batch of %d tenants: %w", len(batch), err)
}

// oneByOne re-reads and re-plans each tenant of a failed batch and commits
// it alone through the Manager. A vanished tenant is skipped.
func (p *pass) oneByOne(ctx context.Context, batch []*store.Tenant) []Change {
	var changes []Change
	now := func() time.Time { return p.now }
	for _, t := range batch {
		var c []Change
		r, err := p.s.Manager.apply(ctx, opScheduled, t.Name, now, func(t *store.Tenant, _ time.Time) error {
			var err error
			c, err = p.plan(t) // apply has run DestroyDue already: c holds the rotation only
			return err
		})
		switch {
		case errors.Is(err, store.ErrNotFound):
		case err != nil:
			p.fail(err)
		case r.written:
			if len(r.destroyed) > 0 {
				changes = append(changes, Change{Op: OpDestroy, Tenant: r.t.Name, TenantID: r.t.ID, Versions: r.destroyed})
			}
			changes = append(changes, c...)
		}
	}
	return changes
}

// committed counts the committed changes, fires the failpoints and calls
// OnBatch.
func (p *pass) committed(ctx context.Context, changes []Change) error {
	for _, c := range changes {
		switch c.Op {
		case OpRotate:
			p.stats.Rotated++
		case OpDestroy:
			p.stats.Destroyed += len(c.Versions)
		}
	}
	if hasOp(changes, OpRotate) {
		failpoint("rotate/after-commit")
	}
	if hasOp(changes, OpDestroy) {
		failpoint("destroy/after-commit")
	}
	if p.s.OnBatch == nil || len(changes) == 0 {
		return nil
	}
	if err := p.s.OnBatch(ctx, changes); err != nil {
		return fmt.Errorf("rotation: batch of %d changes committed, but: %w", len(changes), err)
	}
	return nil
}

func hasOp(changes []Change, op string) bool {
	for _, c := range changes {
		if c.Op == op {
			return true
		}
	}
	return false
}
