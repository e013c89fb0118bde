package rotation

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
)

// changes records OnChange calls.
type changes struct {
	mu  sync.Mutex
	got []Change
	err error // returned by OnChange
}

func (c *changes) onChange(_ context.Context, ch Change) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, ch)
	return c.err
}

func (c *changes) take() []Change {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.got
	c.got = nil
	return out
}

func newManager(t *testing.T) (*Manager, *clock, *changes) {
	t.Helper()
	clk, ch := newClock(t0), &changes{}
	m := &Manager{Store: openStore(t), Now: clk.Now, OnChange: ch.onChange, KDKVersion: func() uint32 { return 2 }}
	createTenants(t, m.Store, "acme", 1, 1, t0, 24*time.Hour)
	return m, clk, ch
}

const acme = "acme-000000"

func TestManagerLifecycle(t *testing.T) {
	ctx := context.Background()
	m, clk, ch := newManager(t)
	clk.Add(time.Hour)
	tn, err := m.Rotate(ctx, acme)
	if err != nil || tn.Current != 2 {
		t.Fatalf("Rotate: %v, current %d", err, tn.Current)
	}
	if kv, _ := tn.Version(2); kv.KDKVersion != 2 || !kv.CreateTime.Equal(clk.Now()) {
		t.Fatalf("new version %+v", kv)
	}
	steps := []struct {
		op   string
		fn   func() (*store.Tenant, error)
		want store.KeyState
	}{
		{OpDisable, func() (*store.Tenant, error) { return m.Disable(ctx, acme, 1) }, store.StateDisabled},
		{OpEnable, func() (*store.Tenant, error) { return m.Enable(ctx, acme, 1) }, store.StateEnabled},
		{OpScheduleDestroy, func() (*store.Tenant, error) { return m.ScheduleDestroy(ctx, acme, 1, 0) }, store.StateDestroyScheduled},
		{OpCancelDestroy, func() (*store.Tenant, error) { return m.CancelDestroy(ctx, acme, 1) }, store.StateDisabled},
	}
	for _, s := range steps {
		tn, err := s.fn()
		if err != nil {
			t.Fatalf("%s: %v", s.op, err)
		}
		stored, err := m.Store.GetTenant(ctx, acme)
		if err != nil || !reflect.DeepEqual(stored, tn) {
			t.Fatalf("%s: the store holds %+v (%v), returned %+v", s.op, stored, err, tn)
		}
		if kv, _ := stored.Version(1); kv.State != s.want {
			t.Fatalf("%s: state %s, want %s", s.op, kv.State, s.want)
		}
	}
	want := []Change{
		{OpRotate, acme, 1, []uint32{2}}, {OpDisable, acme, 1, []uint32{1}}, {OpEnable, acme, 1, []uint32{1}},
		{OpScheduleDestroy, acme, 1, []uint32{1}}, {OpCancelDestroy, acme, 1, []uint32{1}},
	}
	if got := ch.take(); !reflect.DeepEqual(got, want) {
		t.Fatalf("OnChange got %+v\nwant %+v", got, want)
	}
}

func TestManagerRefusedWritesNothing(t *testing.T) {
	ctx := context.Background()
	m, _, ch := newManager(t)
	before, _ := m.Store.GetTenant(ctx, acme)
	for name, fn := range map[string]func() error{
		"disable current": func() error { _, err := m.Disable(ctx, acme, 1); return err },
		"enable enabled":  func() error { _, err := m.Enable(ctx, acme, 1); return err },
		"short wait":      func() error { _, err := m.ScheduleDestroy(ctx, acme, 1, time.Hour); return err },
		"bad policy":      func() error { _, err := m.SetPolicy(ctx, acme, store.Policy{MinDecryptionVersion: 9}); return err },
	} {
		if err := fn(); err == nil {
			t.Errorf("%s: allowed", name)
		}
	}
	if _, err := m.Rotate(ctx, "nobody"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Rotate of a missing tenant: %v", err)
	}
	after, _ := m.Store.GetTenant(ctx, acme)
	if !reflect.DeepEqual(before, after) {
		t.Fatal("a refused operation wrote the tenant")
	}
	if got := ch.take(); got != nil {
		t.Fatalf("OnChange ran for refused operations: %+v", got)
	}
}

func TestManagerMinDestroyWait(t *testing.T) {
	ctx := context.Background()
	m, _, _ := newManager(t)
	if _, err := m.Rotate(ctx, acme); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ScheduleDestroy(ctx, acme, 1, MinDestroyWait-1); !errors.Is(err, ErrWaitTooShort) {
		t.Fatalf("default minimum: %v", err)
	}
	m.MinDestroyWait = NoMinDestroyWait
	tn, err := m.ScheduleDestroy(ctx, acme, 1, time.Second)
	if err != nil {
		t.Fatalf("no minimum: %v", err)
	}
	if kv, _ := tn.Version(1); !kv.DestroyTime.Equal(t0.Add(time.Second)) {
		t.Fatalf("DestroyTime %v", kv.DestroyTime)
	}
}

// A destruction whose time has passed is final, even before the Scheduler
// runs: the Manager destroys it first.
func TestManagerDestroysDueFirst(t *testing.T) {
	ctx := context.Background()
	m, clk, ch := newManager(t)
	m.Rotate(ctx, acme)
	m.Rotate(ctx, acme)
	if _, err := m.ScheduleDestroy(ctx, acme, 1, 0); err != nil {
		t.Fatal(err)
	}
	ch.take()
	clk.Add(DefaultDestroyWait)
	before, _ := m.Store.GetTenant(ctx, acme)
	if _, err := m.CancelDestroy(ctx, acme, 1); !errors.Is(err, ErrTransition) {
		t.Fatalf("CancelDestroy after the time: %v", err)
	}
	if after, _ := m.Store.GetTenant(ctx, acme); after.Revision != before.Revision {
		t.Fatal("a refused operation wrote the due destruction")
	}
	tn, err := m.Disable(ctx, acme, 2)
	if err != nil {
		t.Fatal(err)
	}
	if kv, _ := tn.Version(1); kv.State != store.StateDestroyed || kv.Salt != nil {
		t.Fatalf("version 1 %+v, want destroyed", kv)
	}
	want := []Change{{OpDisable, acme, 1, []uint32{1, 2}}}
	if got := ch.take(); !reflect.DeepEqual(got, want) {
		t.Fatalf("OnChange got %+v, want %+v", got, want)
	}
}

func TestManagerSetPolicyChange(t *testing.T) {
	ctx := context.Background()
	m, _, ch := newManager(t)
	m.Rotate(ctx, acme)
	m.Rotate(ctx, acme)
	ch.take()
	tn, err := m.SetPolicy(ctx, acme, store.Policy{RotationPeriod: time.Hour, MinDecryptionVersion: 3})
	if err != nil || tn.Policy.MinDecryptionVersion != 3 {
		t.Fatalf("SetPolicy: %v", err)
	}
	want := []Change{{OpSetPolicy, acme, 1, []uint32{1, 2}}} // they stopped decrypting
	if got := ch.take(); !reflect.DeepEqual(got, want) {
		t.Fatalf("OnChange got %+v, want %+v", got, want)
	}
}

func TestManagerOnChangeError(t *testing.T) {
	ctx := context.Background()
	m, _, ch := newManager(t)
	ch.err = errors.New("counter broken")
	tn, err := m.Rotate(ctx, acme)
	if !errors.Is(err, ch.err) || tn == nil || tn.Current != 2 {
		t.Fatalf("Rotate = %v, %v", tn, err)
	}
	if stored, _ := m.Store.GetTenant(ctx, acme); stored.Current != 2 {
		t.Fatal("the change was not committed")
	}
}

func TestManagerConcurrentRotate(t *testing.T) {
	ctx := context.Background()
	m, _, ch := newManager(t)
	m.Retries = 1000
	const goroutines, each = 16, 4
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*each)
	for range goroutines {
		wg.Go(func() {
			for range each {
				if _, err := m.Rotate(ctx, acme); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	tn, _ := m.Store.GetTenant(ctx, acme)
	const n = goroutines * each
	if len(tn.Versions) != n+1 || tn.Current != n+1 {
		t.Fatalf("%d versions, current %d; want %d", len(tn.Versions), tn.Current, n+1)
	}
	salts := map[string]bool{}
	for i, kv := range tn.Versions {
		if kv.Version != uint32(i+1) || salts[string(kv.Salt)] {
			t.Fatalf("version %d at %d, or its salt repeats", kv.Version, i)
		}
		salts[string(kv.Salt)] = true
	}
	seen := map[uint32]bool{}
	for _, c := range ch.take() {
		if seen[c.Versions[0]] {
			t.Fatalf("version %d reported twice", c.Versions[0])
		}
		seen[c.Versions[0]] = true
	}
	if len(seen) != n {
		t.Fatalf("%d changes reported, want %d", len(seen), n)
	}
}

func TestManagerRetriesSpent(t *testing.T) {
	ctx := context.Background()
	m, _, _ := newManager(t)
	m.Store = &racingStore{Store: m.Store}
	m.Retries = 3
	if _, err := m.Rotate(ctx, acme); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("Rotate = %v, want ErrConflict", err)
	}
}

// racingStore loses every UpdateTenant race: another writer commits first.
type racingStore struct{ store.Store }

func (s *racingStore) UpdateTenant(ctx context.Context, t *store.Tenant) error {
	other, err := s.Store.GetTenant(ctx, t.Name)
	if err != nil {
		return err
	}
	if err := s.Store.UpdateTenant(ctx, other); err != nil {
		return err
	}
	return s.Store.UpdateTenant(ctx, t)
}

func TestShred(t *testing.T) {
	ctx := context.Background()
	m, _, ch := newManager(t)
	m.Rotate(ctx, acme)
	ch.take()
	if err := m.Shred(ctx, acme); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Store.GetTenant(ctx, acme); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTenant after Shred: %v", err)
	}
	if _, err := m.Store.GetTenantByID(ctx, 1); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTenantByID after Shred: %v", err)
	}
	want := []Change{{OpShred, acme, 1, []uint32{1, 2}}}
	if got := ch.take(); !reflect.DeepEqual(got, want) {
		t.Fatalf("OnChange got %+v, want %+v", got, want)
	}
	if err := m.Shred(ctx, acme); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second Shred: %v", err)
	}
}

func TestFailpoints(t *testing.T) {
	ctx := context.Background()
	m, clk, _ := newManager(t)
	var got []string
	m.OnChange = func(context.Context, Change) error { got = append(got, "OnChange"); return nil }
	Failpoint = func(name string) { got = append(got, name) }
	defer func() { Failpoint = nil }()
	m.MinDestroyWait = NoMinDestroyWait
	m.Rotate(ctx, acme)
	m.ScheduleDestroy(ctx, acme, 1, time.Nanosecond)
	clk.Add(time.Second)
	m.Rotate(ctx, acme) // destroys version 1 first
	m.Shred(ctx, acme)
	want := []string{
		"rotate/before-commit", "rotate/after-commit", "OnChange",
		"OnChange",
		"rotate/before-commit", "rotate/after-commit", "destroy/after-commit", "OnChange",
		"shred/before-delete", "shred/after-delete", "OnChange",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q\nwant %q", got, want)
	}
}
