package storetest

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/hsmd/hsmd/store"
)

// calls runs each Store method once with ctx and returns their errors by
// method name. tn must be a valid tenant; it may be created or updated.
func calls(ctx context.Context, s store.Store, tn *store.Tenant) map[string]error {
	errs := map[string]error{}
	cp := *tn
	errs["CreateTenant"] = s.CreateTenant(ctx, &cp)
	_, errs["GetTenant"] = s.GetTenant(ctx, tn.Name)
	_, errs["GetTenantByID"] = s.GetTenantByID(ctx, tn.ID)
	_, errs["ListTenants"] = s.ListTenants(ctx, "", 10)
	cp = *tn
	errs["UpdateTenant"] = s.UpdateTenant(ctx, &cp)
	return errs
}

func testClose(t *testing.T, f Factory) {
	s, _ := open(t, f)
	tn := newTenant(t, "closing")
	mustCreate(t, s, tn)
	if err := s.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for method, err := range calls(context.Background(), s, tn) {
		if !errors.Is(err, store.ErrClosed) {
			t.Errorf("%s after Close: err = %v, want ErrClosed", method, err)
		}
	}

	// Close racing with itself and with readers: no panic, no race, and
	// every call either works or reports ErrClosed.
	s2, _ := open(t, f)
	mustCreate(t, s2, tn)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			if i%2 == 0 {
				if err := s2.Close(); err != nil {
					t.Errorf("concurrent Close: %v", err)
				}
				return
			}
			if _, err := s2.GetTenant(context.Background(), tn.Name); err != nil && !errors.Is(err, store.ErrClosed) {
				t.Errorf("GetTenant racing Close: err = %v, want nil or ErrClosed", err)
			}
		})
	}
	wg.Wait()
}

func testReopen(t *testing.T, f Factory) {
	s, dir := open(t, f)
	ctx := context.Background()
	a, b := newTenant(t, "kept-a"), newTenant(t, "kept-b")
	mustCreate(t, s, a)
	mustCreate(t, s, b)
	rotate(b)
	if err := s.UpdateTenant(ctx, b); err != nil {
		t.Fatalf("UpdateTenant: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s = openAt(t, f, dir)
	for _, want := range []*store.Tenant{a, b} {
		if d := diff(want, mustGet(t, s, want.Name)); d != "" {
			t.Errorf("after reopen, GetTenant(%q): %s", want.Name, d)
		}
		got, err := s.GetTenantByID(ctx, want.ID)
		if err != nil {
			t.Fatalf("after reopen, GetTenantByID(%d): %v", want.ID, err)
		}
		if d := diff(want, got); d != "" {
			t.Errorf("after reopen, GetTenantByID(%d): %s", want.ID, d)
		}
	}
	// Revisions survive too: the pre-close revision still updates, and a
	// taken name is still taken.
	oldRev := b.Revision
	rotate(b)
	if err := s.UpdateTenant(ctx, b); err != nil {
		t.Fatalf("after reopen, UpdateTenant at revision %d: %v", oldRev, err)
	}
	if b.Revision <= oldRev {
		t.Errorf("after reopen, UpdateTenant set Revision = %d, want > %d", b.Revision, oldRev)
	}
	if err := s.CreateTenant(ctx, newTenant(t, "kept-a")); !errors.Is(err, store.ErrExists) {
		t.Errorf("after reopen, CreateTenant of a taken name: err = %v, want ErrExists", err)
	}
}

func testContextDone(t *testing.T, f Factory) {
	s, _ := open(t, f)
	tn := newTenant(t, "ctx")
	mustCreate(t, s, tn)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	update := mustGet(t, s, tn.Name)
	rotate(update)
	for method, err := range calls(ctx, s, update) {
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a canceled context: err = %v, want context.Canceled", method, err)
		}
	}
	if d := diff(tn, mustGet(t, s, tn.Name)); d != "" {
		t.Errorf("a call with a canceled context wrote: %s", d)
	}
}
