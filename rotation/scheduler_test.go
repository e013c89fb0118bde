package rotation

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"golang.org/x/time/rate"

	"github.com/hsmd/hsmd/store"
)

// batches records OnBatch calls.
type batches struct {
	mu    sync.Mutex
	calls [][]Change
	err   error
}

func (b *batches) onBatch(_ context.Context, c []Change) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = append(b.calls, c)
	return b.err
}

func newScheduler(s store.Store, clk *clock, b *batches) *Scheduler {
	return &Scheduler{
		Manager: &Manager{Store: s, Now: clk.Now},
		Batch:   64,
		Rate:    rate.Inf,
		OnBatch: b.onBatch,
	}
}

// currents returns each tenant's current version, by name.
func currents(t *testing.T, s store.Store) map[string]uint32 {
	t.Helper()
	ts, err := s.ListTenants(context.Background(), "", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint32{}
	for _, tn := range ts {
		out[tn.Name] = tn.Current
	}
	return out
}

func TestSchedulerRotatesDue(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hsmd.db")
	st := openStoreAt(t, path)
	daily := createTenants(t, st, "daily", 1, 300, t0, 24*time.Hour)
	createTenants(t, st, "never", 1000, 20, t0, 0)
	createTenants(t, st, "bidaily", 2000, 20, t0, 48*time.Hour)
	clk, b := newClock(t0.Add(24*time.Hour+30*time.Minute)), &batches{}
	s := newScheduler(st, clk, b)

	var due []string
	for _, tn := range daily {
		next, _ := s.NextRotation(tn)
		if j := next.Sub(t0.Add(24 * time.Hour)); j < 0 || j >= DefaultJitter {
			t.Fatalf("%s: jitter %s out of [0, %s)", tn.Name, j, DefaultJitter)
		}
		if !next.After(clk.Now()) {
			due = append(due, tn.Name)
		}
	}
	if len(due) < 50 || len(due) > 250 {
		t.Fatalf("%d of 300 due half-way through the jitter: not spread", len(due))
	}
	checkPass(t, s, Stats{Scanned: 340, Rotated: len(due)})
	cur := currents(t, st)
	for _, tn := range daily {
		if want := 1 + uint32(b2i(slices.Contains(due, tn.Name))); cur[tn.Name] != want {
			t.Fatalf("%s: current %d, want %d", tn.Name, cur[tn.Name], want)
		}
	}
	for _, c := range b.calls {
		if len(c) > s.Batch {
			t.Fatalf("a batch of %d changes, Batch is %d", len(c), s.Batch)
		}
	}
	b.calls = nil
	checkPass(t, s, Stats{Scanned: 340})
	if b.calls != nil {
		t.Fatalf("OnBatch called without changes: %v", b.calls)
	}

	// Restart: a new store handle and Scheduler on the same file.
	st.Close()
	st = openStoreAt(t, path)
	s = newScheduler(st, clk, b)
	checkPass(t, s, Stats{Scanned: 340})
	clk.Set(t0.Add(25 * time.Hour))
	checkPass(t, s, Stats{Scanned: 340, Rotated: 300 - len(due)})
	checkPass(t, s, Stats{Scanned: 340})
	for name, c := range currents(t, st) {
		if want := uint32(1 + b2i(name[0] == 'd')); c != want {
			t.Fatalf("%s: current %d, want %d", name, c, want)
		}
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func checkPass(t *testing.T, s *Scheduler, want Stats) {
	t.Helper()
	got, err := s.RunOnce(context.Background())
	if err != nil || got != want {
		t.Fatalf("RunOnce = %+v, %v; want %+v", got, err, want)
	}
}

func TestSchedulerJitterStable(t *testing.T) {
	tn := newTenant("a", 12345, t0, 24*time.Hour)
	a, _ := (&Scheduler{}).NextRotation(tn)
	b, _ := (&Scheduler{}).NextRotation(tn)
	none, _ := (&Scheduler{Jitter: -1}).NextRotation(tn)
	if !a.Equal(b) || !none.Equal(t0.Add(24*time.Hour)) {
		t.Fatalf("jitter unstable (%v, %v) or not disabled (%v)", a, b, none)
	}
}

func TestSchedulerDestroys(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	clk, b := newClock(t0), &batches{}
	s := newScheduler(st, clk, b)
	s.Manager.MinDestroyWait = NoMinDestroyWait
	createTenants(t, st, "t", 1, 3, t0, 0)
	for _, name := range []string{"t-000000", "t-000001"} {
		s.Manager.Rotate(ctx, name)
		if _, err := s.Manager.ScheduleDestroy(ctx, name, 1, time.Duration(len(name))*time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	s.Manager.ScheduleDestroy(ctx, "t-000001", 1, 0) // already scheduled: refused
	clk.Add(8 * time.Hour)
	checkPass(t, s, Stats{Scanned: 3, Destroyed: 2})
	for _, name := range []string{"t-000000", "t-000001"} {
		tn, _ := st.GetTenant(ctx, name)
		if kv, _ := tn.Version(1); kv.State != store.StateDestroyed || kv.Salt != nil {
			t.Fatalf("%s version 1: %+v", name, kv)
		}
	}
	want := []Change{{OpDestroy, "t-000000", 1, []uint32{1}}, {OpDestroy, "t-000001", 2, []uint32{1}}}
	if len(b.calls) != 1 || !slices.EqualFunc(b.calls[0], want, changeEqual) {
		t.Fatalf("OnBatch calls %+v, want one with %+v", b.calls, want)
	}
	checkPass(t, s, Stats{Scanned: 3})
}

func changeEqual(a, b Change) bool {
	return a.Op == b.Op && a.Tenant == b.Tenant && a.TenantID == b.TenantID && slices.Equal(a.Versions, b.Versions)
}

// racingBatchStore makes each UpdateTenants lose a race: the Manager
// rotates the batch's first tenant just before.
type racingBatchStore struct {
	store.Store
	m     *Manager
	raced []string
}

func (s *racingBatchStore) UpdateTenants(ctx context.Context, ts []*store.Tenant) error {
	if _, err := s.m.Rotate(ctx, ts[0].Name); err != nil {
		return err
	}
	s.raced = append(s.raced, ts[0].Name)
	return s.Store.UpdateTenants(ctx, ts)
}

func TestSchedulerConflictFallback(t *testing.T) {
	st := openStore(t)
	createTenants(t, st, "t", 1, 100, t0, 24*time.Hour)
	clk, b := newClock(t0.Add(25*time.Hour)), &batches{}
	racing := &racingBatchStore{Store: st, m: &Manager{Store: st, Now: clk.Now}}
	s := newScheduler(racing, clk, b)
	s.Batch = 30
	got, err := s.RunOnce(context.Background())
	if err != nil || len(racing.raced) != 4 {
		t.Fatalf("RunOnce: %v, %d races", err, len(racing.raced))
	}
	if want := (Stats{Scanned: 100, Rotated: 96}); got != want {
		t.Fatalf("stats %+v, want %+v", got, want)
	}
	for name, c := range currents(t, st) {
		if c != 2 {
			t.Fatalf("%s: current %d, want 2 (rotated exactly once)", name, c)
		}
	}
	n := 0
	for _, c := range b.calls {
		n += len(c)
	}
	if len(b.calls) != 4 || n != 96 {
		t.Fatalf("%d OnBatch calls with %d changes", len(b.calls), n)
	}
}

func TestSchedulerFailures(t *testing.T) {
	st := openStore(t)
	createTenants(t, st, "t", 1, 20, t0, time.Hour)
	clk, b := newClock(t0.Add(3*time.Hour)), &batches{}
	s := newScheduler(st, clk, b)
	s.Manager.Rand = iotest.ErrReader(errors.New("no entropy"))
	got, err := s.RunOnce(context.Background())
	if err == nil || got != (Stats{Scanned: 20, Failed: 20}) {
		t.Fatalf("RunOnce = %+v, %v", got, err)
	}
	s.Manager.Rand = nil
	b.err = errors.New("counter broken")
	got, err = s.RunOnce(context.Background())
	if !errors.Is(err, b.err) || got.Rotated != 20 {
		t.Fatalf("RunOnce = %+v, %v; want the OnBatch error after committing", got, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.RunOnce(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("RunOnce with a done context: %v", err)
	}
}

func TestSchedulerRun(t *testing.T) {
	st := openStore(t)
	createTenants(t, st, "t", 1, 5, t0, time.Hour)
	clk := newClock(t0.Add(3 * time.Hour))
	s := newScheduler(st, clk, &batches{})
	s.Interval = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	passes := make(chan Stats, 100)
	s.OnPass = func(st Stats, err error) {
		if err != nil {
			t.Error(err)
		}
		select {
		case passes <- st:
		default:
		}
	}
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	first, second := <-passes, <-passes
	cancel()
	<-done
	if first.Rotated != 5 || second.Rotated != 0 {
		t.Fatalf("passes %+v then %+v", first, second)
	}
}
