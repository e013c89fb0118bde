package bolt_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
	"github.com/hsmd/hsmd/store/storetest"
)

// TestCachedConformance: store.Cached over bbolt passes the suite.
func TestCachedConformance(t *testing.T) {
	storetest.Run(t, storetest.FactoryFunc(func(t *testing.T, dir string) store.Store {
		return store.NewCached(openT(t, filepath.Join(dir, "hsmd.db"), bolt.Options{}))
	}))
}

// TestCachedReadsItsWrites: while readers hammer the cache, every update
// is seen by a read that starts after it returns, by name and by ID; no
// read fills the cache with a record older than a finished write.
func TestCachedReadsItsWrites(t *testing.T) {
	ctx := context.Background()
	c := store.NewCached(openT(t, filepath.Join(t.TempDir(), "hsmd.db"), bolt.Options{}))
	tn := storetest.NewTenant(t, "hot")
	if err := c.CreateTenant(ctx, tn); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				c.GetTenant(ctx, "hot")
				c.GetTenantByID(ctx, tn.ID)
			}
		})
	}
	for i := range 200 {
		tn.Policy.MaxDEKsPerVersion = uint64(i + 1)
		if err := c.UpdateTenant(ctx, tn); err != nil {
			t.Fatal(err)
		}
		byName, err := c.GetTenant(ctx, "hot")
		if err != nil || byName.Revision != tn.Revision || byName.Policy.MaxDEKsPerVersion != uint64(i+1) {
			t.Fatalf("update %d: read %+v %v", i, byName, err)
		}
		byID, err := c.GetTenantByID(ctx, tn.ID)
		if err != nil || byID.Revision != tn.Revision {
			t.Fatalf("update %d: read by ID %+v %v", i, byID, err)
		}
		byName.Policy.MaxDEKsPerVersion = 0 // a copy: the cache keeps its own
	}
	close(stop)
	wg.Wait()
	if err := c.DeleteTenant(ctx, "hot", tn.Revision); err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetTenantByID(ctx, tn.ID); err == nil {
		t.Fatal("a deleted tenant is still served by ID")
	}
}
