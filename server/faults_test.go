package server_test

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/testutil"
)

// faulty wraps the real SoftHSM module and, while armed, fails or stalls
// HMAC (C_Sign) calls.
type faulty struct {
	hsm.Module
	fail  atomic.Uint64 // a CKR_ value to return, 0 = none
	stall atomic.Int64  // nanoseconds to sleep before signing
}

func (f *faulty) Sign(sh pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	if d := f.stall.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	if rv := f.fail.Load(); rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	return f.Module.Sign(sh, msg)
}

func faultyStack(t *testing.T) (*stack, *faulty) {
	f := &faulty{}
	s := newStack(t, stackOpts{
		wrap:   func(m hsm.Module) hsm.Module { f.Module = m; return f },
		hsmCfg: func(c *hsm.Config) { c.CallTimeout = 300 * time.Millisecond },
	})
	return s, f
}

// TestHSMFailureIsUnavailable: while the HSM fails, requests that need a
// new key get UNAVAILABLE (never a wrong answer); once it recovers, they
// succeed.
func TestHSMFailureIsUnavailable(t *testing.T) {
	s, f := faultyStack(t)
	s.createTenant("acme")
	s.createTenant("cold")
	warm := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("warm")})
	f.fail.Store(pkcs11.CKR_DEVICE_ERROR)
	ctx := context.Background()
	_, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "cold", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("encrypt with the HSM failing: %v, want UNAVAILABLE", err)
	}
	// A cached key keeps serving.
	wantOK(t, "cached key", decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: warm[0]})[0], "warm")
	f.fail.Store(0)
	encrypt(t, s, "cold", &hsmdv1.EncryptItem{Plaintext: []byte("x")})
}

// TestHSMStallDoesNotHang: a stalled HSM call returns UNAVAILABLE at the
// call deadline instead of hanging the request.
func TestHSMStallDoesNotHang(t *testing.T) {
	s, f := faultyStack(t)
	s.createTenant("cold")
	f.stall.Store(int64(2 * time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	_, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "cold", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("encrypt with the HSM stalled: %v, want UNAVAILABLE", err)
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Fatalf("the request took %v; the HSM call deadline is 300ms", d)
	}
	f.stall.Store(0)
	time.Sleep(2 * time.Second) // let the stalled call finish before teardown counts sessions
}

// TestTokenGoneGoesNotReady: a fatal HSM error takes readiness down; once
// the token answers again, the HSM recovers in place after its hold-down
// and readiness comes back without a restart.
func TestTokenGoneGoesNotReady(t *testing.T) {
	s, f := faultyStack(t)
	s.createTenant("cold")
	hc := healthpb.NewHealthClient(s.conn)
	waitHealth(t, hc, healthpb.HealthCheckResponse_SERVING)
	f.fail.Store(pkcs11.CKR_TOKEN_NOT_PRESENT)
	start := time.Now()
	_, err := s.env.Encrypt(context.Background(), &hsmdv1.EncryptRequest{Tenant: "cold", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("x")}}})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("encrypt with the token gone: %v, want UNAVAILABLE", err)
	}
	waitHealth(t, hc, healthpb.HealthCheckResponse_NOT_SERVING)
	if v := metricValue(t, s.reg, "hsmd_ready", nil); v != 0 {
		t.Fatalf("hsmd_ready = %v with the token gone", v)
	}
	f.fail.Store(0)
	waitHealth(t, hc, healthpb.HealthCheckResponse_SERVING)
	t.Logf("SERVING again %v after the fault; %+v", time.Since(start).Round(time.Millisecond), s.hsm.Recoveries())
	if v := metricValue(t, s.reg, "hsmd_ready", nil); v != 1 {
		t.Fatalf("hsmd_ready = %v after recovery", v)
	}
	encrypt(t, s, "cold", &hsmdv1.EncryptItem{Plaintext: []byte("x")})
}

func waitHealth(t *testing.T, hc healthpb.HealthClient, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: hsmdv1.Envelope_ServiceDesc.ServiceName})
		if err == nil && r.Status == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("health is %v (%v), want %v", r.GetStatus(), err, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLogsHoldNoSecrets: at debug level, across successes, authentication
// failures and HSM failures (the HSM's own logs of going unusable
// included), the log holds no plaintext, context value or PIN.
func TestLogsHoldNoSecrets(t *testing.T) {
	var logs testutil.SyncBuffer
	f := &faulty{}
	s := newStack(t, stackOpts{
		wrap:   func(m hsm.Module) hsm.Module { f.Module = m; return f },
		log:    &logs,
		hsmCfg: func(c *hsm.Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) },
	})
	s.createTenant("acme")
	s.createTenant("cold")
	secret, ctxVal := "plaintext-7f3a9c", "context-value-51e2"
	c := map[string]string{"purpose": ctxVal}
	cts := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte(secret), Context: c})
	decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: cts[0], Context: c},
		&hsmdv1.DecryptItem{Ciphertext: cts[0], Context: map[string]string{"purpose": ctxVal + "x"}})
	f.fail.Store(pkcs11.CKR_DEVICE_ERROR)
	s.env.Encrypt(context.Background(), &hsmdv1.EncryptRequest{Tenant: "cold", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte(secret), Context: c}}})
	f.fail.Store(pkcs11.CKR_TOKEN_NOT_PRESENT)
	s.env.Encrypt(context.Background(), &hsmdv1.EncryptRequest{Tenant: "cold", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte(secret + "2"), Context: c}}})
	f.fail.Store(0)
	out := logs.String()
	if !strings.Contains(out, "msg=rpc") || !strings.Contains(out, "derivation failed") || !strings.Contains(out, "token unusable") {
		t.Fatalf("the calls and the HSM failures were not logged:\n%s", out)
	}
	for _, s := range []string{secret, ctxVal, strings.TrimSpace(string(s.tok.UserPIN))} {
		if strings.Contains(out, s) {
			t.Errorf("the log holds %q:\n%s", s, out)
		}
	}
}
