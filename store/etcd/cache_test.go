package etcd_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/etcd"
	"github.com/hsmd/hsmd/store/storetest"
)

// cached is a Cache that closes its store too, for the conformance suite.
type cached struct {
	*etcd.Cache
	s *etcd.Store
}

func (c cached) Close() error { c.Cache.Close(); return c.s.Close() }

func newCache(t *testing.T, s *etcd.Store, cfg etcd.CacheConfig) *etcd.Cache {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := etcd.NewCache(ctx, s, cfg)
	if err != nil {
		t.Fatalf("NewCache: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestCache: the cache passes the conformance suite (reads from memory,
// writes through, reading its own writes at once); it follows changes
// made through another client within milliseconds, reporting each; and
// it fails closed once it cannot confirm it is current for MaxStaleness.
func TestCache(t *testing.T) {
	t.Parallel()
	c := etcdtest.Start(t, 3)
	t.Run("Conformance", func(t *testing.T) {
		storetest.Run(t, storetest.FactoryFunc(func(t *testing.T, dir string) store.Store {
			s := openT(t, c.Endpoints(), testPrefix(dir))
			return cached{newCache(t, s, etcd.CacheConfig{}), s}
		}))
	})
	t.Run("Follows", func(t *testing.T) { testCacheFollows(t, c) })
	t.Run("Stale", func(t *testing.T) { testCacheStale(t, c) })
}

// change is one report of CacheConfig.Changed.
type change struct {
	old, new string // "name@revision", or "" for none
}

func describe(t *store.Tenant) string {
	if t == nil {
		return ""
	}
	return t.Name
}

func testCacheFollows(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	prefix := testPrefix(t.TempDir())
	writer := openT(t, c.Endpoints()[:1], prefix)
	reader := openT(t, c.Endpoints()[1:], prefix)
	var mu sync.Mutex
	var changes []change
	var applied []int64
	cache := newCache(t, reader, etcd.CacheConfig{
		Changed: func(old, new *store.Tenant) {
			mu.Lock()
			changes = append(changes, change{describe(old), describe(new)})
			mu.Unlock()
		},
		Applied: func(rev int64) {
			mu.Lock()
			applied = append(applied, rev)
			mu.Unlock()
		},
	})
	await := func(what string, cond func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !cond() {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("the cache did not see %s within 5s", what)
			}
			time.Sleep(time.Millisecond)
		}
		return time.Since(start)
	}

	tn := newTenant(t, "followed")
	create(t, writer, tn)
	d := await("a new tenant", func() bool {
		got, err := cache.GetTenant(ctx, "followed")
		return err == nil && got.Revision == tn.Revision
	})
	t.Logf("a tenant created through another member reached the cache after %v", d)
	if got, err := cache.GetTenantByID(ctx, tn.ID); err != nil || got.Name != "followed" {
		t.Fatalf("GetTenantByID: %+v %v", got, err)
	}
	// A copy: changing it does not change the cache.
	got, _ := cache.GetTenant(ctx, "followed")
	got.Versions[0].State = store.StateDisabled
	if again, _ := cache.GetTenant(ctx, "followed"); again.Versions[0].State != store.StateEnabled {
		t.Fatal("GetTenant returned the cache's own record")
	}

	v2 := tn.Versions[0]
	v2.Version = 2
	tn.Versions = append(tn.Versions, v2)
	tn.Current = 2
	tn.Versions[0].State = store.StateDisabled
	if err := writer.UpdateTenant(ctx, tn); err != nil {
		t.Fatal(err)
	}
	await("a rotation and a disabled version", func() bool {
		got, err := cache.GetTenant(ctx, "followed")
		return err == nil && got.Current == 2 && got.Versions[0].State == store.StateDisabled
	})
	if err := writer.DeleteTenant(ctx, "followed", tn.Revision); err != nil {
		t.Fatal(err)
	}
	await("a shredded tenant", func() bool {
		_, err := cache.GetTenantByID(ctx, tn.ID)
		return errors.Is(err, store.ErrNotFound)
	})
	if _, err := cache.GetTenant(ctx, "followed"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTenant after the delete: %v", err)
	}

	// Writes through the cache are readable through it on return.
	mine := newTenant(t, "mine")
	if err := cache.CreateTenant(ctx, mine); err != nil {
		t.Fatal(err)
	}
	if got, err := cache.GetTenant(ctx, "mine"); err != nil || got.Revision != mine.Revision {
		t.Fatalf("read after write: %+v %v", got, err)
	}
	if cache.LastWrite() != int64(mine.Revision) || cache.Applied() < int64(mine.Revision) {
		t.Fatalf("LastWrite %d, Applied %d, want %d", cache.LastWrite(), cache.Applied(), mine.Revision)
	}

	mu.Lock()
	defer mu.Unlock()
	want := []change{{"", "followed"}, {"followed", "followed"}, {"followed", ""}, {"", "mine"}}
	if !slices.Equal(changes, want) {
		t.Errorf("changes %v, want %v", changes, want)
	}
	if !slices.IsSorted(applied) || applied[len(applied)-1] < int64(mine.Revision) {
		t.Errorf("applied revisions %v", applied)
	}
}

// testCacheStale: with two of three members stopped, known tenants are
// served until MaxStaleness, then refused with ErrStale (which is
// store.ErrUnavailable); once quorum returns, the cache confirms again.
func testCacheStale(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	prefix := testPrefix(t.TempDir())
	s := openT(t, c.Endpoints(), prefix)
	const maxStale = 1500 * time.Millisecond
	cache := newCache(t, s, etcd.CacheConfig{MaxStaleness: maxStale})
	tn := newTenant(t, "known")
	if err := cache.CreateTenant(ctx, tn); err != nil {
		t.Fatal(err)
	}
	c.Stop(1)
	// Quorum is lost during the next Stop, which may take seconds (a
	// graceful stop): measure the bound from its end.
	c.Stop(2)
	lost := time.Now()
	defer func() {
		for _, i := range []int{1, 2} {
			if err := c.Restart(i); err != nil {
				t.Errorf("restart member %d: %v", i, err)
			}
		}
	}()
	var served time.Duration
	for {
		_, err := cache.GetTenant(ctx, "known")
		if err != nil {
			if !errors.Is(err, etcd.ErrStale) || !errors.Is(err, store.ErrUnavailable) {
				t.Fatalf("stale read: %v, want ErrStale", err)
			}
			served = time.Since(lost)
			break
		}
		if time.Since(lost) > 4*maxStale {
			t.Fatalf("still served %v after quorum loss (max staleness %v)", time.Since(lost), maxStale)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("served known keys for %v after the second member stopped (max staleness %v)", served, maxStale)
	if served > maxStale+time.Second {
		t.Errorf("served %v, more than max staleness %v plus a confirmation interval", served, maxStale)
	}
	if err := cache.CreateTenant(ctx, newTenant(t, "during")); err == nil {
		t.Fatal("a write without quorum succeeded")
	}
	if err := c.Restart(1); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := cache.GetTenant(ctx, "known"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the cache did not confirm again after quorum returned")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
