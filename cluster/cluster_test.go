package cluster_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hsmd/hsmd/cluster"
	"github.com/hsmd/hsmd/internal/etcdtest"
)

const prefix = "/hsmd-test/"

func join(t *testing.T, e *etcdtest.Cluster, name string, ttl int) *cluster.Node {
	t.Helper()
	n, err := cluster.Join(t.Context(), cluster.Config{Client: e.Client(t), Prefix: prefix, Name: name, Addr: name + ":7443", TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// TestMembersAndWaitApplied: members are listed with what they applied;
// WaitApplied returns once every member has applied the revision, names
// the ones that have not when its context ends, and stops waiting for a
// member that leaves. A second replica of the same name is refused.
func TestMembersAndWaitApplied(t *testing.T) {
	e := etcdtest.Start(t, 1)
	a, b := join(t, e, "a", 0), join(t, e, "b", 0)
	if _, err := cluster.Join(t.Context(), cluster.Config{Client: e.Client(t), Prefix: prefix, Name: "a"}); err == nil || !strings.Contains(err.Error(), "already a member") {
		t.Fatalf("a second replica named a: %v", err)
	}
	a.Applied(10)
	b.Applied(5)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	err := a.WaitApplied(ctx, 10)
	cancel()
	var ue *cluster.UnconfirmedError
	if !errors.As(err, &ue) || strings.Join(ue.Members, ",") != "b" || ue.Revision != 10 {
		t.Fatalf("WaitApplied with b behind: %v, want b unconfirmed", err)
	}
	done := make(chan error, 1)
	go func() { done <- a.WaitApplied(t.Context(), 10) }()
	time.Sleep(50 * time.Millisecond)
	b.Applied(12)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WaitApplied did not see b catch up")
	}
	ms, _, err := a.Members(t.Context())
	if err != nil || len(ms) != 2 || ms[0].Name != "a" || ms[0].Applied != 10 || ms[1].Applied != 12 || ms[1].Addr != "b:7443" {
		t.Fatalf("members %+v %v", ms, err)
	}

	go func() { done <- a.WaitApplied(t.Context(), 20) }()
	time.Sleep(50 * time.Millisecond)
	a.Applied(20)
	b.Close() // leaves: no longer waited for
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WaitApplied waited for a member that left")
	}
	if ms, _, _ := a.Members(t.Context()); len(ms) != 1 {
		t.Fatalf("members after b left: %+v", ms)
	}
}

// TestLeaderFailover: of three members exactly one runs the job at a time;
// when the leader leaves (Close) another takes over at once, and when the
// leader's process "dies" (its etcd client is cut, its lease left to
// expire) another takes over within the TTL plus a campaign.
func TestLeaderFailover(t *testing.T) {
	e := etcdtest.Start(t, 1)
	const ttl = 2
	var running atomic.Int32
	var overlap atomic.Bool
	var mu sync.Mutex
	leaders := make(chan string, 16)
	type member struct {
		node   *cluster.Node
		cancel context.CancelFunc
		done   chan struct{}
		cut    func()
	}
	start := func(name string) *member {
		cli := e.Client(t)
		n, err := cluster.Join(t.Context(), cluster.Config{Client: cli, Prefix: prefix, Name: name, TTL: ttl})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		m := &member{node: n, cancel: cancel, done: make(chan struct{}), cut: func() { cli.Close() }}
		go func() {
			defer close(m.done)
			n.Lead(ctx, func(ctx context.Context) {
				if running.Add(1) > 1 {
					overlap.Store(true)
				}
				mu.Lock()
				leaders <- name
				mu.Unlock()
				<-ctx.Done()
				running.Add(-1)
			}, nil)
		}()
		t.Cleanup(func() { cancel(); <-m.done; n.Close() })
		return m
	}
	ms := map[string]*member{"a": start("a"), "b": start("b"), "c": start("c")}
	first := waitLeader(t, leaders)
	st, err := cluster.ReadStatus(t.Context(), e.Client(t), prefix)
	if err != nil || st.Leader != first || len(st.Members) != 3 {
		t.Fatalf("status %+v %v, want leader %s of 3", st, err, first)
	}
	if !ms[first].node.IsLeader() {
		t.Fatal("the leader does not know it leads")
	}

	// The leader resigns (its campaign is cancelled and it leaves).
	t0 := time.Now()
	ms[first].cancel()
	<-ms[first].done
	ms[first].node.Close()
	second := waitLeader(t, leaders)
	t.Logf("failover after a clean stop: %v", time.Since(t0))
	if second == first {
		t.Fatalf("%s led again", first)
	}

	// The new leader dies without resigning: its lease must expire.
	t0 = time.Now()
	ms[second].cut()
	third := waitLeader(t, leaders)
	took := time.Since(t0)
	t.Logf("failover after a crash (lease TTL %ds): %v", ttl, took)
	if third == second || third == first {
		t.Fatalf("leader %s after %s and %s", third, first, second)
	}
	if took > 3*ttl*time.Second {
		t.Errorf("failover took %v, more than 3 TTLs", took)
	}
	// Here the dead leader's client noticed at once (it was closed), so no
	// two jobs ever ran together. (A partitioned leader would run on until
	// its client gives the lease up: at most one TTL; see the package doc.)
	if overlap.Load() {
		t.Error("two leaders' jobs ran at the same time")
	}
}

func waitLeader(t *testing.T, leaders <-chan string) string {
	t.Helper()
	select {
	case name := <-leaders:
		return name
	case <-time.After(20 * time.Second):
		t.Fatal("no leader within 20s")
		return ""
	}
}
