package storetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
)

// rotate adds a key version to tn and makes it current, as a rotation would.
func rotate(tn *store.Tenant) {
	next := tn.Versions[len(tn.Versions)-1].Version + 1
	tn.Versions = append(tn.Versions, store.KeyVersion{
		Version:    next,
		KDKVersion: 1,
		State:      store.StateEnabled,
		Salt:       randomSalt(),
		CreateTime: time.Now(),
	})
	tn.Current = next
}

func testUpdate(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	mustCreate(t, s, newTenant(t, "upd"))
	tn := mustGet(t, s, "upd")
	for range 3 {
		old := tn.Revision
		rotate(tn)
		tn.Versions[0].Salt[0]++
		if err := s.UpdateTenant(ctx, tn); err != nil {
			t.Fatalf("UpdateTenant at revision %d: %v", old, err)
		}
		if tn.Revision <= old {
			t.Fatalf("UpdateTenant set Revision = %d, want > %d", tn.Revision, old)
		}
		got := mustGet(t, s, "upd")
		if d := diff(tn, got); d != "" {
			t.Fatalf("GetTenant after update: %s", d)
		}
		byID, err := s.GetTenantByID(ctx, tn.ID)
		if err != nil {
			t.Fatalf("GetTenantByID after update: %v", err)
		}
		if d := diff(tn, byID); d != "" {
			t.Fatalf("GetTenantByID after update: %s", d)
		}
	}
}

func testUpdateStale(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	mustCreate(t, s, newTenant(t, "stale"))
	a := mustGet(t, s, "stale")
	b := mustGet(t, s, "stale")
	rotate(a)
	if err := s.UpdateTenant(ctx, a); err != nil {
		t.Fatalf("first UpdateTenant: %v", err)
	}
	b.Versions[0].Salt[0]++
	staleRev := b.Revision
	if err := s.UpdateTenant(ctx, b); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("UpdateTenant at a stale revision: err = %v, want ErrConflict", err)
	}
	if b.Revision != staleRev {
		t.Errorf("failed UpdateTenant changed Revision from %d to %d", staleRev, b.Revision)
	}
	for _, rev := range []uint64{0, a.Revision + 1, a.Revision + 1000} {
		b.Revision = rev
		if err := s.UpdateTenant(ctx, b); !errors.Is(err, store.ErrConflict) {
			t.Errorf("UpdateTenant at revision %d (stored %d): err = %v, want ErrConflict", rev, a.Revision, err)
		}
	}
	if d := diff(a, mustGet(t, s, "stale")); d != "" {
		t.Errorf("after rejected updates: %s", d)
	}
}

func testUpdateMissing(t *testing.T, f Factory) {
	s, _ := open(t, f)
	tn := newTenant(t, "ghost")
	tn.Revision = 1
	if err := s.UpdateTenant(context.Background(), tn); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("UpdateTenant of a missing tenant: err = %v, want ErrNotFound", err)
	}
	if _, err := s.GetTenant(context.Background(), "ghost"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetTenant after UpdateTenant of a missing tenant: err = %v, want ErrNotFound", err)
	}
}

func testUpdateInvalid(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	orig := newTenant(t, "fixed")
	mustCreate(t, s, orig)

	moved := mustGet(t, s, "fixed")
	oldID := moved.ID
	moved.ID++
	if err := s.UpdateTenant(ctx, moved); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("UpdateTenant changing the ID: err = %v, want ErrInvalid", err)
	}
	if _, err := s.GetTenantByID(ctx, moved.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetTenantByID(new ID) after rejected update: err = %v, want ErrNotFound", err)
	}
	if _, err := s.GetTenantByID(ctx, oldID); err != nil {
		t.Errorf("GetTenantByID(old ID) after rejected update: %v", err)
	}

	bad := mustGet(t, s, "fixed")
	bad.Current = 99
	if err := s.UpdateTenant(ctx, bad); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("UpdateTenant with a missing current version: err = %v, want ErrInvalid", err)
	}
	bad = mustGet(t, s, "fixed")
	bad.Versions[0].Salt = nil
	if err := s.UpdateTenant(ctx, bad); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("UpdateTenant with a zero salt: err = %v, want ErrInvalid", err)
	}
	if err := s.UpdateTenant(ctx, nil); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("UpdateTenant(nil): err = %v, want ErrInvalid", err)
	}
	if d := diff(orig, mustGet(t, s, "fixed")); d != "" {
		t.Errorf("after rejected updates: %s", d)
	}
}

// testDelete: DeleteTenant removes the tenant and its ID, refuses a stale
// revision, and the name can be used again (with a new ID).
func testDelete(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	tn := newTenant(t, "gone")
	mustCreate(t, s, tn)
	if err := s.DeleteTenant(ctx, "gone", tn.Revision+1); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("DeleteTenant at a wrong revision: %v, want ErrConflict", err)
	}
	if err := s.DeleteTenant(ctx, "gone", tn.Revision); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetTenant(ctx, "gone"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTenant after delete: %v", err)
	}
	if _, err := s.GetTenantByID(ctx, tn.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTenantByID after delete: %v", err)
	}
	if err := s.DeleteTenant(ctx, "gone", tn.Revision); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second DeleteTenant: %v, want ErrNotFound", err)
	}
	mustCreate(t, s, newTenant(t, "gone"))
}

// testUpdateMany: UpdateTenants writes all or nothing.
func testUpdateMany(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	var ts []*store.Tenant
	for _, n := range []string{"m1", "m2", "m3"} {
		tn := newTenant(t, n)
		mustCreate(t, s, tn)
		rotate(tn)
		ts = append(ts, tn)
	}
	stale := *ts[2]
	stale.Revision++
	if err := s.UpdateTenants(ctx, []*store.Tenant{ts[0], ts[1], &stale}); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("a batch with a stale tenant: %v, want ErrConflict", err)
	}
	if got := mustGet(t, s, "m1"); len(got.Versions) != 2 || ts[0].Revision != got.Revision {
		t.Fatal("a failed batch wrote a tenant or moved a revision")
	}
	if err := s.UpdateTenants(ctx, ts); err != nil {
		t.Fatal(err)
	}
	for _, tn := range ts {
		if d := diff(tn, mustGet(t, s, tn.Name)); d != "" {
			t.Fatalf("%s after the batch: %s", tn.Name, d)
		}
	}
}
