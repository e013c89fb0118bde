// Package storetest is the conformance suite every store.Store backend must
// pass. A backend's test calls Run with a Factory:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, storetest.FactoryFunc(func(t *testing.T, dir string) store.Store {
//			s, err := bolt.Open(filepath.Join(dir, "hsmd.db"), bolt.Options{})
//			if err != nil {
//				t.Fatal(err)
//			}
//			return s
//		}))
//	}
//
// # Contract checked beyond the store.Store doc comments
//
//   - Times round-trip to at least one-second precision and come back in UTC,
//     whatever location they were written in. (The bbolt backend keeps
//     nanoseconds.) Comparisons in this suite truncate to the second.
//   - Revisions are non-zero after CreateTenant and strictly increase with
//     every UpdateTenant; their exact values are the backend's business (a
//     per-record counter, an etcd mod revision).
//   - Names sort byte-wise (for valid names, Go string order).
//   - ListTenants with limit < 1 returns store.ErrInvalid; past the last
//     tenant it returns an empty page and no error.
//   - GetTenant of a name that is not valid returns store.ErrNotFound.
//   - UpdateTenant that changes the ID returns store.ErrInvalid.
//   - CreateTenant and UpdateTenant with a nil tenant return store.ErrInvalid.
//   - Every method returns ctx.Err() when called with a done context, and
//     store.ErrClosed after Close; Close is safe twice.
//   - Every returned *Tenant is the caller's own copy, and the store keeps no
//     reference to a *Tenant passed in.
//
// All errors are checked with errors.Is, so backends may wrap them.
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
)

// Factory opens stores of one backend for Run.
type Factory interface {
	// Open opens the store kept under dir, creating an empty one the first
	// time. Run gives each subtest a new empty directory from t.TempDir
	// and may call Open again with the same dir after closing the first
	// store, expecting the data to be there; a backend that keeps no files
	// (etcd) can use dir as a unique key prefix. Open calls t.Fatal if it
	// fails. Run closes every store it opens; Open may register its own
	// t.Cleanup too, since Close is safe twice.
	Open(t *testing.T, dir string) store.Store
}

// FactoryFunc adapts a function to Factory.
type FactoryFunc func(t *testing.T, dir string) store.Store

// Open calls f(t, dir).
func (f FactoryFunc) Open(t *testing.T, dir string) store.Store { return f(t, dir) }

// Run runs the conformance suite against the backend of f, one subtest per
// behaviour. Subtests run sequentially; each opens its own stores.
func Run(t *testing.T, f Factory) {
	tests := []struct {
		name string
		fn   func(t *testing.T, f Factory)
	}{
		{"CreateGetRoundTrip", testCreateGetRoundTrip},
		{"DuplicateName", testDuplicateName},
		{"DuplicateID", testDuplicateID},
		{"Invalid", testInvalid},
		{"NotFound", testNotFound},
		{"ListPagination", testListPagination},
		{"ListLimit", testListLimit},
		{"Update", testUpdate},
		{"UpdateStale", testUpdateStale},
		{"UpdateMissing", testUpdateMissing},
		{"UpdateInvalid", testUpdateInvalid},
		{"Delete", testDelete},
		{"UpdateMany", testUpdateMany},
		{"Copies", testCopies},
		{"ConcurrentCreate", testConcurrentCreate},
		{"ConcurrentUpdate", testConcurrentUpdate},
		{"ConcurrentUpdateNoLostWrites", testConcurrentUpdateNoLostWrites},
		{"Close", testClose},
		{"Reopen", testReopen},
		{"ContextDone", testContextDone},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, f) })
	}
}

// open opens a store in a fresh directory and closes it at cleanup. It
// returns the directory for a later reopen.
func open(t *testing.T, f Factory) (store.Store, string) {
	t.Helper()
	dir := t.TempDir()
	return openAt(t, f, dir), dir
}

func openAt(t *testing.T, f Factory, dir string) store.Store {
	t.Helper()
	s := f.Open(t, dir)
	if s == nil {
		t.Fatal("Factory.Open returned a nil store")
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// zone is a non-UTC location, to check that stores return UTC.
var zone = time.FixedZone("UTC+05:30", 5*3600+30*60)

// newTenant returns a valid tenant with a random ID and salt, two key
// versions, and times with sub-second parts in a non-UTC location.
func newTenant(t *testing.T, name string) *store.Tenant {
	t.Helper()
	created := time.Date(2026, 3, 4, 5, 6, 7, 123456789, zone)
	tn := &store.Tenant{
		Name:    name,
		ID:      randomID(t),
		Current: 2,
		Versions: []store.KeyVersion{
			{Version: 1, KDKVersion: 1, State: store.StateEnabled, CreateTime: created, Salt: randomSalt()},
			{Version: 2, KDKVersion: 3, State: store.StateEnabled, CreateTime: created.Add(36*time.Hour + 1), Salt: randomSalt()},
		},
		Policy:     store.Policy{RotationPeriod: 90 * 24 * time.Hour, MinDecryptionVersion: 1},
		CreateTime: created,
	}
	return tn
}

func randomSalt() []byte {
	b := make([]byte, store.SaltSize)
	rand.Read(b)
	return b
}

func randomID(t *testing.T) uint64 {
	t.Helper()
	var b [8]byte
	for {
		rand.Read(b[:])
		if id := binary.BigEndian.Uint64(b[:]); id != 0 {
			return id
		}
	}
}

// diff describes the first difference between want and got, comparing
// times to the second and requiring got's times to be in UTC; "" if none.
func diff(want, got *store.Tenant) string {
	switch {
	case got == nil:
		return "got nil tenant"
	case got.Name != want.Name:
		return fmt.Sprintf("Name = %q, want %q", got.Name, want.Name)
	case got.ID != want.ID:
		return fmt.Sprintf("ID = %d, want %d", got.ID, want.ID)
	case got.Policy != want.Policy:
		return fmt.Sprintf("Policy = %+v, want %+v", got.Policy, want.Policy)
	case got.Current != want.Current:
		return fmt.Sprintf("Current = %d, want %d", got.Current, want.Current)
	case got.Revision != want.Revision:
		return fmt.Sprintf("Revision = %d, want %d", got.Revision, want.Revision)
	case len(got.Versions) != len(want.Versions):
		return fmt.Sprintf("len(Versions) = %d, want %d", len(got.Versions), len(want.Versions))
	}
	if d := diffTime("CreateTime", want.CreateTime, got.CreateTime); d != "" {
		return d
	}
	for i, w := range want.Versions {
		g := got.Versions[i]
		if g.Version != w.Version || g.KDKVersion != w.KDKVersion || g.State != w.State || !bytes.Equal(g.Salt, w.Salt) {
			return fmt.Sprintf("Versions[%d] = %+v, want %+v", i, g, w)
		}
		if d := diffTime(fmt.Sprintf("Versions[%d].CreateTime", i), w.CreateTime, g.CreateTime); d != "" {
			return d
		}
	}
	return ""
}

func diffTime(field string, want, got time.Time) string {
	if got.Location() != time.UTC {
		return fmt.Sprintf("%s location = %v, want UTC", field, got.Location())
	}
	if !got.Truncate(time.Second).Equal(want.Truncate(time.Second)) {
		return fmt.Sprintf("%s = %v, want %v", field, got, want)
	}
	return ""
}

// mustCreate creates tn or fails t.
func mustCreate(t *testing.T, s store.Store, tn *store.Tenant) {
	t.Helper()
	if err := s.CreateTenant(context.Background(), tn); err != nil {
		t.Fatalf("CreateTenant(%q): %v", tn.Name, err)
	}
}

// mustGet returns the tenant named name or fails t.
func mustGet(t *testing.T, s store.Store, name string) *store.Tenant {
	t.Helper()
	got, err := s.GetTenant(context.Background(), name)
	if err != nil {
		t.Fatalf("GetTenant(%q): %v", name, err)
	}
	return got
}

// NewTenant returns a valid tenant named name with a random ID and salts
// and two key versions, for backend-specific tests.
func NewTenant(t *testing.T, name string) *store.Tenant { return newTenant(t, name) }
