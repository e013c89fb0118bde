package server_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/server"
)

// retryDelay checks that err is RESOURCE_EXHAUSTED naming limit, with a
// positive RetryInfo delay, and returns the delay.
func retryDelay(t *testing.T, err error, limit string) time.Duration {
	t.Helper()
	st := status.Convert(err)
	if st.Code() != codes.ResourceExhausted {
		t.Fatalf("%v, want RESOURCE_EXHAUSTED", err)
	}
	if !strings.Contains(st.Message(), limit) {
		t.Errorf("message %q does not name %s", st.Message(), limit)
	}
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			if d := ri.GetRetryDelay().AsDuration(); d > 0 {
				return d
			}
			t.Fatalf("RetryInfo delay %v, want > 0", ri.GetRetryDelay())
		}
	}
	t.Fatalf("%v: no RetryInfo detail", err)
	return 0
}

// TestRatePerIdentity: with 5 calls/s in bursts of 5, a caller's burst
// passes, the next call is refused with a RetryInfo delay, and a call after
// that delay passes; another identity (TCP, not the unix socket) has its
// own bucket, and health probes are exempt.
func TestRatePerIdentity(t *testing.T) {
	s := newStack(t, stackOpts{limits: server.Limits{RatePerIdentity: 5, BurstPerIdentity: 5}})
	ctx := context.Background()
	list := func(c hsmdv1.TenantsClient) error {
		_, err := c.ListTenants(ctx, &hsmdv1.ListTenantsRequest{})
		return err
	}
	for i := range 5 {
		if err := list(s.tenants); err != nil {
			t.Fatalf("call %d of the burst: %v", i+1, err)
		}
	}
	// The 6th call is refused unless a token came back meanwhile (200 ms
	// each): allow a few more calls on a slow machine.
	var err error
	for range 3 {
		if err = list(s.tenants); err != nil {
			break
		}
	}
	d := retryDelay(t, err, "limits.rate_per_identity")
	if d > time.Second {
		t.Errorf("retry delay %v, want at most 200ms", d)
	}
	if _, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health probe while rate limited: %v", err)
	}
	// The TCP caller is another identity.
	tcp := hsmdv1.NewTenantsClient(s.tcp)
	for i := range 5 {
		if err := list(tcp); err != nil {
			t.Fatalf("TCP call %d while the unix caller is limited: %v", i+1, err)
		}
	}
	time.Sleep(d)
	if err := list(s.tenants); err != nil {
		t.Fatalf("after the retry delay: %v", err)
	}
}

// blockingSign, while armed, holds HMAC (C_Sign) calls until released and
// reports each that starts; the readiness probe's HMAC passes.
type blockingSign struct {
	hsm.Module
	armed   atomic.Bool
	started chan struct{}
	release chan struct{}
}

func (b *blockingSign) Sign(sh pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	if b.armed.Load() && string(msg) != "hsmd/ready-probe" {
		b.started <- struct{}{}
		<-b.release
	}
	return b.Module.Sign(sh, msg)
}

// TestConcurrencyPerIdentity: with 2 calls in flight per identity, a third
// call of the same caller is refused with RESOURCE_EXHAUSTED and a RetryInfo
// delay while another identity's calls pass; once the two finish, the
// caller is admitted again.
func TestConcurrencyPerIdentity(t *testing.T) {
	b := &blockingSign{started: make(chan struct{}, 2), release: make(chan struct{})}
	s := newStack(t, stackOpts{
		limits: server.Limits{MaxConcurrentPerIdentity: 2},
		hsmCfg: func(c *hsm.Config) { c.CallTimeout = 30 * time.Second },
		wrap:   func(m hsm.Module) hsm.Module { b.Module = m; return b },
	})
	s.createTenant("a")
	s.createTenant("b")
	b.armed.Store(true)
	var once sync.Once
	release := func() { once.Do(func() { close(b.release) }) }
	t.Cleanup(release)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, tenant := range []string{"a", "b"} {
		wg.Go(func() {
			_, errs[i] = s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: tenant, Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
		})
	}
	// Both calls are in flight, each waiting in the HSM.
	for range 2 {
		select {
		case <-b.started:
		case <-time.After(10 * time.Second):
			t.Fatal("the calls did not reach the HSM")
		}
	}
	_, err := s.tenants.ListTenants(ctx, &hsmdv1.ListTenantsRequest{})
	retryDelay(t, err, "limits.max_concurrent_per_identity")
	if _, err := hsmdv1.NewTenantsClient(s.tcp).ListTenants(ctx, &hsmdv1.ListTenantsRequest{}); err != nil {
		t.Errorf("another identity while the unix caller is at its limit: %v", err)
	}
	if _, err := healthpb.NewHealthClient(s.conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health probe at the concurrency limit: %v", err)
	}
	release()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("held call %d: %v", i, err)
		}
	}
	if _, err := s.tenants.ListTenants(ctx, &hsmdv1.ListTenantsRequest{}); err != nil {
		t.Fatalf("after the held calls finished: %v", err)
	}
}
