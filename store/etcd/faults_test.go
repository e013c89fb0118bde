package etcd_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/etcd"
)

// slack is how much later than its deadline or timeout a call may return
// (the race detector on a small machine is slow).
const slack = 2 * time.Second

// deadEndpoint returns the URL of a loopback port nothing listens on.
func deadEndpoint(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "http://" + l.Addr().String()
}

// timed runs fn and fails t if it took longer than bound + slack.
func timed(t *testing.T, what string, bound time.Duration, fn func() error) error {
	t.Helper()
	start := time.Now()
	err := fn()
	if took := time.Since(start); took > bound+slack {
		t.Errorf("%s took %v, want about %v", what, took, bound)
	}
	return err
}

// methods runs every Store method once with ctx against s, where tn exists,
// and returns their errors by name.
func methods(t *testing.T, ctx context.Context, s *etcd.Store, tn *store.Tenant) map[string]error {
	errs := map[string]error{}
	fresh := newTenant(t, "fresh")
	errs["CreateTenant"] = s.CreateTenant(ctx, fresh)
	_, errs["GetTenant"] = s.GetTenant(ctx, tn.Name)
	_, errs["GetTenantByID"] = s.GetTenantByID(ctx, tn.ID)
	_, errs["ListTenants"] = s.ListTenants(ctx, "", 10)
	cp := *tn
	errs["UpdateTenant"] = s.UpdateTenant(ctx, &cp)
	errs["DeleteTenant"] = s.DeleteTenant(ctx, tn.Name, tn.Revision)
	_, errs["Revision"] = s.Revision(ctx)
	return errs
}

// testUnavailable: with no etcd to answer, Open and every method fail
// within the caller's deadline or the request timeout, Close aborts a
// waiting call, and a store works again once etcd is back. It stops and
// restarts member 0 of c.
func testUnavailable(t *testing.T, c *etcdtest.Cluster) {
	bg := context.Background()
	dead := []string{deadEndpoint(t)}
	err := timed(t, "Open of a dead endpoint with a deadline", 300*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
		defer cancel()
		_, err := etcd.Open(ctx, etcd.Options{Endpoints: dead})
		return err
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Open of a dead endpoint with a deadline: %v, want context.DeadlineExceeded", err)
	}
	err = timed(t, "Open of a dead endpoint", 300*time.Millisecond, func() error {
		_, err := etcd.Open(bg, etcd.Options{Endpoints: dead, RequestTimeout: 300 * time.Millisecond})
		return err
	})
	if !errors.Is(err, etcd.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Open of a dead endpoint: %v, want ErrUnavailable (and not the caller's deadline)", err)
	}

	prefix := testPrefix(t.TempDir())
	s, err := etcd.Open(bg, etcd.Options{Endpoints: c.Endpoints(), Prefix: prefix, RequestTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	waiting := openT(t, c.Endpoints(), prefix) // the default request timeout
	tn := newTenant(t, "before")
	create(t, s, tn)

	c.Stop(0)
	for method, err := range methods(t, bg, s, tn) {
		if !errors.Is(err, etcd.ErrUnavailable) {
			t.Errorf("%s without etcd: %v, want ErrUnavailable", method, err)
		}
	}
	ctx, cancel := context.WithTimeout(bg, 100*time.Millisecond)
	err = timed(t, "GetTenant without etcd, with a deadline", 100*time.Millisecond, func() error {
		_, err := waiting.GetTenant(ctx, "before")
		return err
	})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("GetTenant without etcd, with a deadline: %v, want context.DeadlineExceeded", err)
	}

	errc := make(chan error, 1)
	go func() {
		_, err := waiting.GetTenant(bg, "before")
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond)
	err = timed(t, "Close with a waiting call", 0, func() error {
		if err := waiting.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		return <-errc
	})
	if !errors.Is(err, store.ErrClosed) {
		t.Errorf("a call waiting for etcd when Close came: %v, want ErrClosed", err)
	}

	if err := c.Restart(0); err != nil {
		t.Fatal(err)
	}
	// The client reconnects with a backoff: retry for a while.
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := s.GetTenant(bg, "before")
		if err == nil {
			if got.Revision != tn.Revision {
				t.Errorf("after restart, revision %d, want %d", got.Revision, tn.Revision)
			}
			break
		}
		if !errors.Is(err, etcd.ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("GetTenant after etcd restarted: %v", err)
		}
	}
}
