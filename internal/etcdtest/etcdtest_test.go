package etcdtest_test

import (
	"context"
	"testing"
	"time"

	"github.com/hsmd/hsmd/internal/etcdtest"
)

// TestStopRestart: a 3-member cluster serves with one member stopped, not
// with two (no quorum), and again once a member is restarted; a restarted
// member serves its own clients.
func TestStopRestart(t *testing.T) {
	c := etcdtest.Start(t, 3)
	if c.Size() != 3 || len(c.Endpoints()) != 3 {
		t.Fatalf("Size = %d, Endpoints = %v; want 3 members", c.Size(), c.Endpoints())
	}
	cli := c.Client(t)
	put := func(timeout time.Duration, v string) error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		_, err := cli.Put(ctx, "k", v)
		return err
	}
	if err := put(5*time.Second, "all"); err != nil {
		t.Fatalf("put with 3 members: %v", err)
	}

	c.Stop(0)
	c.Stop(0) // no-op
	if err := put(5*time.Second, "two"); err != nil {
		t.Fatalf("put with 2 of 3 members: %v", err)
	}

	c.Stop(1)
	start := time.Now()
	if err := put(time.Second, "one"); err == nil {
		t.Fatal("put with 1 of 3 members succeeded")
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("put without quorum took %v, want about the 1s deadline", took)
	}

	if err := c.Restart(1); err != nil {
		t.Fatalf("Restart(1): %v", err)
	}
	if err := c.Restart(1); err != nil { // no-op
		t.Fatalf("second Restart(1): %v", err)
	}
	if err := put(5*time.Second, "two again"); err != nil {
		t.Fatalf("put after restart: %v", err)
	}
	if err := c.Restart(0); err != nil {
		t.Fatalf("Restart(0): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.Client(t, c.Endpoint(0)).Get(ctx, "k")
	if err != nil {
		t.Fatalf("get from the restarted member: %v", err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "two again" {
		t.Errorf("restarted member has %v, want k = two again", resp.Kvs)
	}
}
