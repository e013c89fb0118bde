package rotation

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"
	"golang.org/x/time/rate"

	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
)

// bulkCreate writes n tenants named bulk-%07d (IDs 1..n, created at t0,
// rotating daily) into a new store file at path, in large bbolt
// transactions following the file layout documented by package store/bolt
// (CreateTenant's one fsync per tenant would take minutes for 100,000).
// TestBulkCreate checks the result against the store.
func bulkCreate(tb testing.TB, path string, n int) {
	tb.Helper()
	s, err := bolt.Open(path, bolt.Options{}) // creates the buckets
	if err != nil {
		tb.Fatal(err)
	}
	s.Close()
	db, err := bbolt.Open(path, bolt.FileMode, &bbolt.Options{NoSync: true})
	if err != nil {
		tb.Fatal(err)
	}
	defer db.Close()
	const txSize = 10_000
	for first := 0; first < n; first += txSize {
		err := db.Update(func(tx *bbolt.Tx) error {
			for i := first; i < min(first+txSize, n); i++ {
				if err := putTenant(tx, bulkTenant(i)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	if err := db.Sync(); err != nil {
		tb.Fatal(err)
	}
}

func bulkTenant(i int) *store.Tenant {
	return newTenant(fmt.Sprintf("bulk-%07d", i), uint64(i)+1, t0, 24*time.Hour)
}

// putTenant writes t at revision 1 in the layout of package store/bolt.
func putTenant(tx *bbolt.Tx, t *store.Tenant) error {
	val, err := json.Marshal(struct {
		Revision uint64        `json:"revision"`
		Tenant   *store.Tenant `json:"tenant"`
	}{1, t})
	if err != nil {
		return err
	}
	if err := tx.Bucket([]byte("tenants")).Put([]byte(t.Name), val); err != nil {
		return err
	}
	return tx.Bucket([]byte("ids")).Put(binary.BigEndian.AppendUint64(nil, t.ID), []byte(t.Name))
}

func TestBulkCreate(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "hsmd.db")
	bulkCreate(t, path, 3)
	s := openStoreAt(t, path)
	for i := range 3 {
		want := bulkTenant(i)
		want.Revision = 1
		got, err := s.GetTenantByID(ctx, want.ID)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("got %+v (%v), want %+v", got, err, want)
		}
	}
}

// rotateAll runs one RunOnce over n bulk-created tenants, all due, and
// checks that each was rotated.
func rotateAll(tb testing.TB, s *Scheduler, clk *clock, n int) {
	clk.Add(25 * time.Hour) // the period plus the largest jitter
	st, err := s.RunOnce(context.Background())
	if err != nil || st != (Stats{Scanned: n, Rotated: n}) {
		tb.Fatalf("RunOnce = %+v, %v; want %d rotated", st, err, n)
	}
}

func benchScheduler(tb testing.TB, n int) (*Scheduler, *clock) {
	path := filepath.Join(tb.TempDir(), "hsmd.db")
	bulkCreate(tb, path, n)
	clk := newClock(t0)
	return &Scheduler{Manager: &Manager{Store: openStoreAt(tb, path), Now: clk.Now}, Rate: rate.Inf}, clk
}

// TestRotateMany is the benchmark's path at a smaller size.
func TestRotateMany(t *testing.T) {
	const n = 5000
	s, clk := benchScheduler(t, n)
	start := time.Now()
	rotateAll(t, s, clk, n)
	t.Logf("rotated %d tenants in %s", n, time.Since(start))
	rotateAll(t, s, clk, n)
}

// BenchmarkRotate100k rotates 100,000 tenants, all due, with one RunOnce
// per iteration (default Batch, no rate bound, no HSM: rotation is metadata
// only). Run: go test -run '^$' -bench Rotate100k -benchtime 3x ./rotation/
func BenchmarkRotate100k(b *testing.B) {
	const n = 100_000
	s, clk := benchScheduler(b, n)
	for b.Loop() {
		start := time.Now()
		rotateAll(b, s, clk, n)
		b.Logf("rotated %d tenants in %s", n, time.Since(start))
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "tenants/s")
}
