package rotation

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
)

// t0 is the tests' epoch.
var t0 = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

// openStore opens a real bbolt store in a temporary directory, closed at the
// end of the test.
func openStore(tb testing.TB) *bolt.Store {
	tb.Helper()
	return openStoreAt(tb, filepath.Join(tb.TempDir(), "hsmd.db"))
}

func openStoreAt(tb testing.TB, path string) *bolt.Store {
	tb.Helper()
	s, err := bolt.Open(path, bolt.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// salt returns a valid salt derived from n.
func salt(n uint64) []byte {
	b := bytes.Repeat([]byte{0xa5}, store.SaltSize)
	for i := range 8 {
		b[i] ^= byte(n >> (8 * i))
	}
	return b
}

// newTenant returns a valid tenant with one enabled version created at
// created, rotating every period.
func newTenant(name string, id uint64, created time.Time, period time.Duration) *store.Tenant {
	return &store.Tenant{
		Name:    name,
		ID:      id,
		Current: 1,
		Versions: []store.KeyVersion{{
			Version: 1, KDKVersion: 1, State: store.StateEnabled, Salt: salt(id), CreateTime: created,
		}},
		Policy:     store.Policy{RotationPeriod: period},
		CreateTime: created,
	}
}

// createTenants creates n tenants named prefix-%06d with IDs from firstID.
func createTenants(tb testing.TB, s store.Store, prefix string, firstID uint64, n int, created time.Time, period time.Duration) []*store.Tenant {
	tb.Helper()
	out := make([]*store.Tenant, n)
	for i := range n {
		t := newTenant(fmt.Sprintf("%s-%06d", prefix, i), firstID+uint64(i), created, period)
		if err := s.CreateTenant(context.Background(), t); err != nil {
			tb.Fatal(err)
		}
		out[i] = t
	}
	return out
}

// clone returns a deep copy of t.
func clone(t *store.Tenant) *store.Tenant {
	c := *t
	c.Versions = make([]store.KeyVersion, len(t.Versions))
	for i, kv := range t.Versions {
		if kv.Salt != nil {
			kv.Salt = bytes.Clone(kv.Salt)
		}
		c.Versions[i] = kv
	}
	return &c
}

// clock is a settable clock, safe for concurrent use.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock(t time.Time) *clock { return &clock{now: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

func (c *clock) Add(d time.Duration) { c.Set(c.Now().Add(d)) }
