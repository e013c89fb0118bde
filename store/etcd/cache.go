package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"

	"github.com/hsmd/hsmd/store"
)

// DefaultMaxStaleness is how long a Cache serves reads after it last
// confirmed, with a quorum read, that it had applied every change.
const DefaultMaxStaleness = 30 * time.Second

// ErrStale: a Cache has not been able to confirm for longer than its
// MaxStaleness that it holds every committed change (etcd has no quorum,
// or cannot be reached), so it refuses to answer rather than risk serving
// a key version that was disabled, destroyed or shredded meanwhile.
var ErrStale = fmt.Errorf("etcd: metadata cache is stale: %w", ErrUnavailable)

// CacheConfig configures NewCache.
type CacheConfig struct {
	// MaxStaleness bounds how old the cache's last confirmation may be
	// for reads to be served. Zero means DefaultMaxStaleness.
	MaxStaleness time.Duration
	// Applied, if set, is told each store revision the cache has applied
	// (cluster.Node.Applied).
	Applied func(rev int64)
	// Changed, if set, is told each tenant that changed or went (new is nil
	// after a delete; old is nil for a tenant new to the cache), after the
	// cache holds the new state. It must not block for long.
	Changed func(old, new *store.Tenant)
	// Logger receives watch restarts and records the cache could not
	// decode; nil discards them.
	Logger *slog.Logger
}

// Cache is a store.Store over a Store that answers GetTenant and
// GetTenantByID from memory: it loads every tenant record once and then
// follows them through an etcd watch, so a change committed by any
// replica reaches it within the watch's delay (milliseconds). Writes and
// ListTenants go to the Store; a write returns once the cache has applied
// it (a replica reads its own writes).
//
// Staleness is bounded: every MaxStaleness/4 the cache reads the cluster's
// revision with a quorum read and confirms that its watch has delivered
// everything up to it. Reads are refused with ErrStale once the last
// confirmation is older than MaxStaleness: while etcd has no quorum, known
// keys keep working for that long, then the replica fails closed.
type Cache struct {
	s   *Store
	cfg CacheConfig
	log *slog.Logger

	mu       sync.RWMutex
	byName   map[string]*store.Tenant
	byID     map[uint64]*store.Tenant
	applied  int64
	freshAt  time.Time     // when the last confirmed quorum read was sent
	progress chan struct{} // closed and replaced when applied advances

	closed atomic.Bool
	stop   context.CancelFunc
	done   chan struct{}
	loaded chan error
}

// NewCache loads every tenant of s and follows them until Close (which
// does not close s). It returns once the first load is done, or its error.
func NewCache(ctx context.Context, s *Store, cfg CacheConfig) (*Cache, error) {
	if cfg.MaxStaleness == 0 {
		cfg.MaxStaleness = DefaultMaxStaleness
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Cache{s: s, cfg: cfg, log: cfg.Logger, progress: make(chan struct{}), done: make(chan struct{}), loaded: make(chan error, 1)}
	wctx, stop := context.WithCancel(context.Background())
	c.stop = stop
	go c.run(wctx)
	select {
	case err := <-c.loaded:
		if err != nil {
			stop()
			<-c.done
			return nil, err
		}
	case <-ctx.Done():
		stop()
		<-c.done
		return nil, ctx.Err()
	}
	return c, nil
}

// Close stops following the store; later calls return store.ErrClosed.
// Safe to call twice.
func (c *Cache) Close() error {
	c.closed.Store(true)
	c.stop()
	<-c.done
	return nil
}

// Applied returns the store revision the cache has applied.
func (c *Cache) Applied() int64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.applied
}

// Staleness is how long ago the cache last confirmed it was current.
func (c *Cache) Staleness() time.Duration {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return time.Since(c.freshAt)
}

// run loads, watches and confirms until ctx ends, loading afresh after a
// watch failure (a compaction, a lost member).
func (c *Cache) run(ctx context.Context) {
	defer close(c.done)
	first := true
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := c.load(ctx)
		if first {
			c.loaded <- err
			if err != nil {
				return
			}
			first = false
		}
		if err == nil {
			backoff = 50 * time.Millisecond
			err = c.follow(ctx, rev)
		}
		if ctx.Err() != nil {
			return
		}
		c.log.Warn("etcd: metadata cache: reloading", slog.Any("error", err))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// load reads every tenant record at one revision and replaces the cache.
func (c *Cache) load(ctx context.Context) (int64, error) {
	sent := time.Now()
	rctx, end, err := c.s.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer end()
	resp, err := c.s.client.Get(rctx, c.s.TenantsPrefix(), clientv3.WithPrefix())
	if err != nil {
		return 0, c.s.fail(rctx, "load the metadata cache", err)
	}
	byName := make(map[string]*store.Tenant, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), c.s.TenantsPrefix())
		t, err := decode(name, kv)
		if err != nil {
			c.log.Error("etcd: metadata cache: a tenant record cannot be used", slog.Any("error", err))
			continue // its calls fail as not found rather than with an old state
		}
		byName[name] = t
	}
	c.mu.Lock()
	old := c.byName
	c.byName, c.byID = byName, make(map[uint64]*store.Tenant, len(byName))
	for _, t := range byName {
		c.byID[t.ID] = t
	}
	c.advance(resp.Header.Revision, sent)
	c.mu.Unlock()
	if c.cfg.Changed != nil {
		for name, o := range old {
			if n := byName[name]; n == nil || n.Revision != o.Revision {
				c.cfg.Changed(o, n)
			}
		}
		for name, n := range byName {
			if old[name] == nil && old != nil {
				c.cfg.Changed(nil, n)
			}
		}
	}
	if c.cfg.Applied != nil {
		c.cfg.Applied(resp.Header.Revision)
	}
	return resp.Header.Revision, nil
}

// advance records revision rev applied and, if sent is set, confirmed as
// of sent. c.mu must be held.
func (c *Cache) advance(rev int64, sent time.Time) {
	if rev > c.applied {
		c.applied = rev
		close(c.progress)
		c.progress = make(chan struct{})
	}
	if sent.After(c.freshAt) {
		c.freshAt = sent
	}
}

// follow applies the watch from rev+1, confirming freshness on a ticker,
// until the watch fails or ctx ends.
func (c *Cache) follow(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(watchStream(ctx))
	defer cancel()
	wch := c.s.client.Watch(wctx, c.s.TenantsPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	confirm := make(chan error, 1)
	go c.confirmLoop(wctx, confirm)
	for {
		select {
		case err := <-confirm:
			return err
		case wr, ok := <-wch:
			if !ok {
				return errors.New("the watch ended")
			}
			if err := wr.Err(); err != nil {
				return err
			}
			// A progress notification says every event up to its header's
			// revision was delivered; an event response only that its own
			// events were (its header may be ahead of a batch cut short).
			rev := wr.Header.Revision
			if !wr.IsProgressNotify() {
				if len(wr.Events) == 0 {
					continue
				}
				rev = wr.Events[len(wr.Events)-1].Kv.ModRevision
			}
			c.apply(rev, wr.Events)
		}
	}
}

// watchStream gives the cache's watch a gRPC stream of its own (etcd
// answers a progress request only when every watcher of the stream is
// current, so another watch on the stream, such as cluster.WaitApplied's,
// would silence it), and makes etcd end it when its member loses the
// leader. Progress requests must use a context from it.
func watchStream(ctx context.Context) context.Context {
	return clientv3.WithRequireLeader(metadata.AppendToOutgoingContext(ctx, "hsmd-watch", "metadata-cache"))
}

// apply applies one watch response's events, then advances to rev.
func (c *Cache) apply(rev int64, events []*clientv3.Event) {
	type change struct{ old, new *store.Tenant }
	var changes []change
	c.mu.Lock()
	for _, ev := range events {
		name := strings.TrimPrefix(string(ev.Kv.Key), c.s.TenantsPrefix())
		old := c.byName[name]
		var t *store.Tenant
		if ev.Type == mvccpb.PUT {
			var err error
			if t, err = decode(name, ev.Kv); err != nil {
				c.log.Error("etcd: metadata cache: a tenant record cannot be used", slog.Any("error", err))
			}
		}
		if old != nil {
			delete(c.byID, old.ID)
			delete(c.byName, name)
		}
		if t != nil {
			c.byName[name], c.byID[t.ID] = t, t
		}
		if old != nil || t != nil {
			changes = append(changes, change{old, t})
		}
	}
	c.advance(rev, time.Time{})
	c.mu.Unlock()
	if c.cfg.Changed != nil {
		for _, ch := range changes {
			c.cfg.Changed(ch.old, ch.new)
		}
	}
	if c.cfg.Applied != nil {
		c.cfg.Applied(rev)
	}
}

// confirmLoop confirms freshness every MaxStaleness/4 (at least every
// 100 ms ... at most every 5 s): a quorum read of the revision, then a
// watch progress request, whose answer tells the watch has delivered
// everything up to a revision at least as new. It reports a failure to
// confirm only by not confirming (reads then go stale); it returns an
// error on errc only if the watch stream itself seems stuck.
func (c *Cache) confirmLoop(ctx context.Context, errc chan<- error) {
	every := min(max(c.cfg.MaxStaleness/4, 100*time.Millisecond), 5*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		sent := time.Now()
		rctx, cancel := context.WithTimeout(ctx, every)
		resp, err := c.s.client.Get(rctx, c.s.prefix+"version", clientv3.WithCountOnly())
		if err == nil {
			err = c.catchUp(rctx, resp.Header.Revision)
		}
		cancel()
		switch {
		case err == nil:
			c.mu.Lock()
			c.advance(0, sent)
			c.mu.Unlock()
		case ctx.Err() != nil:
			return
		case resp != nil && errors.Is(err, context.DeadlineExceeded):
			// etcd answered the quorum read but the watch did not catch up:
			// restart it.
			errc <- fmt.Errorf("the watch is behind revision %d", resp.Header.Revision)
			return
		}
	}
}

// catchUp waits until the cache has applied revision rev, asking the watch
// for a progress notification (on ctx, which must carry the watch's
// stream: derive it from follow's context) every 100 ms while it has not.
func (c *Cache) catchUp(ctx context.Context, rev int64) error {
	for {
		if err := c.s.client.RequestProgress(ctx); err != nil {
			return err
		}
		wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		err := c.waitApplied(wctx, rev)
		cancel()
		if err == nil || ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// waitApplied waits until the cache has applied revision rev.
func (c *Cache) waitApplied(ctx context.Context, rev int64) error {
	for {
		c.mu.RLock()
		applied, progress := c.applied, c.progress
		c.mu.RUnlock()
		if applied >= rev {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-progress:
		}
	}
}

// fresh returns ctx's error, store.ErrClosed after Close, or ErrStale if
// the last confirmation is too old. c.mu must be held for reading.
func (c *Cache) fresh(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if c.closed.Load() {
		return errClosed
	}
	if age := time.Since(c.freshAt); age > c.cfg.MaxStaleness {
		return fmt.Errorf("%w (last confirmed %s ago, max_staleness %s)", ErrStale, age.Round(time.Millisecond), c.cfg.MaxStaleness)
	}
	return nil
}

// GetTenant returns a copy of the cached tenant named name, or
// store.ErrNotFound, or ErrStale.
func (c *Cache) GetTenant(ctx context.Context, name string) (*store.Tenant, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if err := c.fresh(ctx); err != nil {
		return nil, err
	}
	t := c.byName[name]
	if t == nil {
		return nil, fmt.Errorf("etcd: tenant %q: %w", name, store.ErrNotFound)
	}
	return t.Clone(), nil
}

// GetTenantByID is GetTenant by ID.
func (c *Cache) GetTenantByID(ctx context.Context, id uint64) (*store.Tenant, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if err := c.fresh(ctx); err != nil {
		return nil, err
	}
	t := c.byID[id]
	if t == nil {
		return nil, fmt.Errorf("etcd: tenant id %016x: %w", id, store.ErrNotFound)
	}
	return t.Clone(), nil
}

// ListTenants reads the store (not the cache).
func (c *Cache) ListTenants(ctx context.Context, after string, limit int) ([]*store.Tenant, error) {
	return c.s.ListTenants(ctx, after, limit)
}

// CreateTenant writes to the store and waits until the cache has it. If
// the name or ID is taken, it first catches up with the store, so that a
// GetTenant that follows sees the tenant another replica created.
func (c *Cache) CreateTenant(ctx context.Context, t *store.Tenant) error {
	if err := c.s.CreateTenant(ctx, t); err != nil {
		if errors.Is(err, store.ErrExists) {
			if rev, rerr := c.s.Revision(ctx); rerr == nil {
				sctx, cancel := context.WithTimeout(watchStream(ctx), c.s.timeout)
				c.catchUp(sctx, rev)
				cancel()
			}
		}
		return err
	}
	return c.waitWrite(ctx, int64(t.Revision))
}

// UpdateTenant writes to the store and waits until the cache has it.
func (c *Cache) UpdateTenant(ctx context.Context, t *store.Tenant) error {
	if err := c.s.UpdateTenant(ctx, t); err != nil {
		return err
	}
	return c.waitWrite(ctx, int64(t.Revision))
}

// UpdateTenants writes to the store and waits until the cache has them.
func (c *Cache) UpdateTenants(ctx context.Context, ts []*store.Tenant) error {
	if err := c.s.UpdateTenants(ctx, ts); err != nil {
		return err
	}
	if len(ts) == 0 {
		return nil
	}
	return c.waitWrite(ctx, int64(ts[0].Revision))
}

// DeleteTenant deletes from the store and waits until the cache has
// dropped the tenant.
func (c *Cache) DeleteTenant(ctx context.Context, name string, revision uint64) error {
	if err := c.s.DeleteTenant(ctx, name, revision); err != nil {
		return err
	}
	return c.waitWrite(ctx, c.s.LastWrite())
}

// waitWrite waits, bounded by the store's request timeout, until the cache
// has applied the write at revision rev.
func (c *Cache) waitWrite(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithTimeout(ctx, c.s.timeout)
	defer cancel()
	if err := c.waitApplied(wctx, rev); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: the change is committed (revision %d) but this replica has not seen it within %s", ErrUnavailable, rev, c.s.timeout)
	}
	return nil
}

// LastWrite is the revision of the newest write made through the cache's
// store: every replica whose cache has applied it has this one's changes.
func (c *Cache) LastWrite() int64 { return c.s.LastWrite() }
