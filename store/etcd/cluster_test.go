package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/etcd"
	"github.com/hsmd/hsmd/store/storetest"
)

// TestCluster runs the conformance suite on a 3-member cluster, races two
// clients on different members, and loses and regains quorum (last).
func TestCluster(t *testing.T) {
	t.Parallel()
	c := etcdtest.Start(t, 3)
	t.Run("Conformance", func(t *testing.T) { storetest.Run(t, factory(c)) })
	t.Run("TwoClients", func(t *testing.T) { testTwoClients(t, c) })
	t.Run("QuorumLoss", func(t *testing.T) { testQuorumLoss(t, c) })
}

// both runs a(), b() at once and returns their errors.
func both(a, b func() error) (errA, errB error) {
	start := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { <-start; errA = a() })
	wg.Go(func() { <-start; errB = b() })
	close(start)
	wg.Wait()
	return errA, errB
}

// oneWins checks that exactly one of errA, errB is nil and the other wraps
// loser, and returns 0 or 1 for the winner (-1 if none).
func oneWins(t *testing.T, what string, errA, errB, loser error) int {
	t.Helper()
	switch {
	case errA == nil && errors.Is(errB, loser):
		return 0
	case errB == nil && errors.Is(errA, loser):
		return 1
	}
	t.Errorf("%s: errors %v and %v, want one nil and one %v", what, errA, errB, loser)
	return -1
}

// testTwoClients: two stores with clients on different members race to
// create the same name, the same ID, and to update the same revision;
// exactly one wins each race, and both see the winner.
func testTwoClients(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	prefix := testPrefix(t.TempDir())
	stores := []*etcd.Store{openT(t, []string{c.Endpoint(0)}, prefix), openT(t, []string{c.Endpoint(1)}, prefix)}
	for round := range 10 {
		name := fmt.Sprintf("same-name-%d", round)
		ts := []*store.Tenant{newTenant(t, name), newTenant(t, name)}
		errA, errB := both(
			func() error { return stores[0].CreateTenant(ctx, ts[0]) },
			func() error { return stores[1].CreateTenant(ctx, ts[1]) })
		w := oneWins(t, "CreateTenant of one name", errA, errB, store.ErrExists)
		if w < 0 {
			continue
		}
		for i, s := range stores {
			if got, err := s.GetTenant(ctx, name); err != nil || got.ID != ts[w].ID {
				t.Errorf("round %d: store %d: GetTenant = %+v, %v; want the winner's ID", round, i, got, err)
			}
			if _, err := s.GetTenantByID(ctx, ts[1-w].ID); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("round %d: store %d: GetTenantByID of the loser: %v, want ErrNotFound", round, i, err)
			}
		}

		ts = []*store.Tenant{newTenant(t, fmt.Sprintf("a-%d", round)), newTenant(t, fmt.Sprintf("b-%d", round))}
		ts[1].ID = ts[0].ID
		errA, errB = both(
			func() error { return stores[0].CreateTenant(ctx, ts[0]) },
			func() error { return stores[1].CreateTenant(ctx, ts[1]) })
		if w := oneWins(t, "CreateTenant of one ID", errA, errB, store.ErrExists); w >= 0 {
			if _, err := stores[w].GetTenant(ctx, ts[1-w].Name); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("round %d: the loser of an ID race was created: %v", round, err)
			}
		}

		copies := make([]*store.Tenant, 2)
		for i, s := range stores {
			var err error
			if copies[i], err = s.GetTenant(ctx, name); err != nil {
				t.Fatal(err)
			}
			copies[i].Policy.MaxDEKsPerVersion = uint64(i + 1)
		}
		errA, errB = both(
			func() error { return stores[0].UpdateTenant(ctx, copies[0]) },
			func() error { return stores[1].UpdateTenant(ctx, copies[1]) })
		if w := oneWins(t, "UpdateTenant of one revision", errA, errB, store.ErrConflict); w >= 0 {
			if got, err := stores[1-w].GetTenant(ctx, name); err != nil || got.Policy.MaxDEKsPerVersion != uint64(w+1) {
				t.Errorf("round %d: after the update race: %+v, %v; want the winner's", round, got, err)
			}
		}
	}
}

// testQuorumLoss: a store on every member works with one of three
// stopped; with two stopped it fails within its request timeout or the
// caller's deadline, and works again once one is back.
func testQuorumLoss(t *testing.T, c *etcdtest.Cluster) {
	bg := context.Background()
	s, err := etcd.Open(bg, etcd.Options{Endpoints: c.Endpoints(), Prefix: testPrefix(t.TempDir()), RequestTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	create(t, s, newTenant(t, "three"))

	c.Stop(2)
	create(t, s, newTenant(t, "two"))
	if _, err := s.GetTenant(bg, "three"); err != nil {
		t.Fatalf("GetTenant with 2 of 3 members: %v", err)
	}

	c.Stop(1)
	err = timed(t, "GetTenant without quorum", time.Second, func() error {
		_, err := s.GetTenant(bg, "three")
		return err
	})
	if !errors.Is(err, etcd.ErrUnavailable) {
		t.Errorf("GetTenant without quorum: %v, want ErrUnavailable", err)
	}
	ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
	err = timed(t, "CreateTenant without quorum, with a deadline", 300*time.Millisecond, func() error {
		return s.CreateTenant(ctx, newTenant(t, "one"))
	})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("CreateTenant without quorum, with a deadline: %v, want context.DeadlineExceeded", err)
	}

	if err := c.Restart(1); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.CreateTenant(bg, newTenant(t, "two-again"))
		if err == nil {
			break
		}
		// A create that timed out may have been applied: that is the
		// documented ambiguity of ErrUnavailable.
		if !errors.Is(err, etcd.ErrUnavailable) && !errors.Is(err, store.ErrExists) || time.Now().After(deadline) {
			t.Fatalf("CreateTenant after quorum is back: %v", err)
		}
		if errors.Is(err, store.ErrExists) {
			break
		}
	}
	for _, name := range []string{"three", "two", "two-again"} {
		if _, err := s.GetTenant(bg, name); err != nil {
			t.Errorf("GetTenant(%q) after quorum is back: %v", name, err)
		}
	}
	if _, err := s.GetTenant(bg, "one"); err != nil && !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetTenant of the create without quorum: %v", err)
	}
	if err := c.Restart(2); err != nil {
		t.Fatal(err)
	}
}
