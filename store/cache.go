package store

import (
	"context"
	"sync"
)

// Cached is a Store that keeps the tenants it has read in memory, for a
// single node whose store only this process writes (bbolt): GetTenant and
// GetTenantByID answer from memory after the first read, saving a read
// transaction and a record decoding per request. Every write goes to the
// underlying store and then drops the tenant from the cache, so a read
// after a write sees it. Callers get copies (Tenant.Clone), as from any
// Store. It is safe for concurrent use.
//
// It must not be used over a store that other processes write (etcd: use
// the watched cache of package store/etcd).
type Cached struct {
	Store
	mu     sync.RWMutex
	byName map[string]*Tenant
	byID   map[uint64]*Tenant
	gen    uint64 // bumped by every write: a read begun before it must not fill the cache
}

// NewCached returns a Cached over s.
func NewCached(s Store) *Cached {
	return &Cached{Store: s, byName: map[string]*Tenant{}, byID: map[uint64]*Tenant{}}
}

// GetTenant returns a copy of the tenant named name.
func (c *Cached) GetTenant(ctx context.Context, name string) (*Tenant, error) {
	c.mu.RLock()
	t, gen := c.byName[name], c.gen
	c.mu.RUnlock()
	if t != nil {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return t.Clone(), nil
	}
	t, err := c.Store.GetTenant(ctx, name)
	if err != nil {
		return nil, err
	}
	c.fill(t, gen)
	return t, nil
}

// GetTenantByID returns a copy of the tenant with the given ID.
func (c *Cached) GetTenantByID(ctx context.Context, id uint64) (*Tenant, error) {
	c.mu.RLock()
	t, gen := c.byID[id], c.gen
	c.mu.RUnlock()
	if t != nil {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return t.Clone(), nil
	}
	t, err := c.Store.GetTenantByID(ctx, id)
	if err != nil {
		return nil, err
	}
	c.fill(t, gen)
	return t, nil
}

// fill caches a copy of t, read when the generation was gen, unless a
// write came since.
func (c *Cached) fill(t *Tenant, gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	cp := t.Clone()
	c.byName[t.Name], c.byID[t.ID] = cp, cp
}

// forget drops the tenants named and bumps the generation. It runs before
// and after each write: before, so no read sees the old record once the
// write may have committed; after, so no read that began during the write
// fills the cache with what it read before the commit.
func (c *Cached) forget(names ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for _, n := range names {
		if t := c.byName[n]; t != nil {
			delete(c.byID, t.ID)
			delete(c.byName, n)
		}
	}
}

// CreateTenant writes t.
func (c *Cached) CreateTenant(ctx context.Context, t *Tenant) error {
	if t == nil {
		return c.Store.CreateTenant(ctx, t) // the store's error
	}
	c.forget(t.Name)
	defer c.forget(t.Name)
	return c.Store.CreateTenant(ctx, t)
}

// UpdateTenant writes t.
func (c *Cached) UpdateTenant(ctx context.Context, t *Tenant) error {
	if t == nil {
		return c.Store.UpdateTenant(ctx, t)
	}
	c.forget(t.Name)
	defer c.forget(t.Name)
	return c.Store.UpdateTenant(ctx, t)
}

// UpdateTenants writes ts in one transaction.
func (c *Cached) UpdateTenants(ctx context.Context, ts []*Tenant) error {
	names := make([]string, 0, len(ts))
	for _, t := range ts {
		if t != nil {
			names = append(names, t.Name)
		}
	}
	c.forget(names...)
	defer c.forget(names...)
	return c.Store.UpdateTenants(ctx, ts)
}

// DeleteTenant removes the tenant named name.
func (c *Cached) DeleteTenant(ctx context.Context, name string, revision uint64) error {
	c.forget(name)
	defer c.forget(name)
	return c.Store.DeleteTenant(ctx, name, revision)
}
