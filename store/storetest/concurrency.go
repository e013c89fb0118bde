package storetest

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/hsmd/hsmd/store"
)

const (
	goroutines = 16
	rounds     = 5
	// perWriter is the number of successful updates each writer makes in
	// testConcurrentUpdateNoLostWrites.
	perWriter = 5
)

// together runs fn(i) for i in [0, n) in n goroutines released at once, and
// returns their errors.
func together(n int, fn func(i int) error) []error {
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			errs[i] = fn(i)
		})
	}
	close(start)
	wg.Wait()
	return errs
}

// oneWinner checks that exactly one of errs is nil and every other one
// wraps loser. It returns the index of the winner, or -1.
func oneWinner(t *testing.T, what string, errs []error, loser error) int {
	t.Helper()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("%s: goroutines %d and %d both succeeded", what, winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, loser):
			t.Errorf("%s: goroutine %d: err = %v, want %v", what, i, err, loser)
		}
	}
	if winner < 0 {
		t.Errorf("%s: no goroutine succeeded", what)
	}
	return winner
}

func testConcurrentCreate(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	for r := range rounds {
		name := listNames[r]
		tenants := make([]*store.Tenant, goroutines)
		for i := range tenants {
			tenants[i] = newTenant(t, name)
		}
		errs := together(goroutines, func(i int) error { return s.CreateTenant(ctx, tenants[i]) })
		w := oneWinner(t, "CreateTenant("+name+")", errs, store.ErrExists)
		if w < 0 {
			continue
		}
		if d := diff(tenants[w], mustGet(t, s, name)); d != "" {
			t.Errorf("stored tenant is not the winner's: %s", d)
		}
		for i, tn := range tenants {
			if _, err := s.GetTenantByID(ctx, tn.ID); i != w && !errors.Is(err, store.ErrNotFound) {
				t.Errorf("GetTenantByID of a loser: err = %v, want ErrNotFound", err)
			}
		}
	}
}

func testConcurrentUpdate(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	mustCreate(t, s, newTenant(t, "race"))
	for r := range rounds {
		base := mustGet(t, s, "race")
		copies := make([]*store.Tenant, goroutines)
		for i := range copies {
			copies[i] = mustGet(t, s, "race")
			copies[i].Versions[0].Salt[0] = byte(i + 1)
			copies[i].Versions[0].Salt[1] = byte(r)
		}
		errs := together(goroutines, func(i int) error { return s.UpdateTenant(ctx, copies[i]) })
		w := oneWinner(t, "UpdateTenant", errs, store.ErrConflict)
		if w < 0 {
			continue
		}
		got := mustGet(t, s, "race")
		if d := diff(copies[w], got); d != "" {
			t.Errorf("round %d: stored tenant is not the winner's: %s", r, d)
		}
		if got.Revision <= base.Revision {
			t.Errorf("round %d: revision %d after update from %d", r, got.Revision, base.Revision)
		}
	}
}

// testConcurrentUpdateNoLostWrites has writers each add perWriter key
// versions with read-modify-write loops that retry on ErrConflict, and
// checks that every version added is there at the end.
func testConcurrentUpdateNoLostWrites(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	initial := newTenant(t, "counter")
	mustCreate(t, s, initial)
	const writers = goroutines / 2
	errs := together(writers, func(int) error {
		for done := 0; done < perWriter; {
			tn, err := s.GetTenant(ctx, "counter")
			if err != nil {
				return err
			}
			rotate(tn)
			switch err := s.UpdateTenant(ctx, tn); {
			case err == nil:
				done++
			case !errors.Is(err, store.ErrConflict):
				return err
			}
		}
		return nil
	})
	for i, err := range errs {
		if err != nil {
			t.Errorf("writer %d: %v", i, err)
		}
	}
	got := mustGet(t, s, "counter")
	if want := len(initial.Versions) + writers*perWriter; len(got.Versions) != want {
		t.Errorf("after %d updates: %d versions, want %d (lost updates)", writers*perWriter, len(got.Versions), want)
	}
}
