package client

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// replicaFake is a fake server on a loopback port counting its calls.
type replicaFake struct {
	addr  string
	srv   *grpc.Server
	calls atomic.Int64
}

func startReplicaFake(t *testing.T) *replicaFake {
	t.Helper()
	r := &replicaFake{}
	count := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		r.calls.Add(1)
		return h(ctx, req)
	}
	r.srv = grpc.NewServer(grpc.UnaryInterceptor(count))
	hsmdv1.RegisterEnvelopeServer(r.srv, &fake{pageSize: 2})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go r.srv.Serve(l) //nolint:errcheck // Serve returns when Stop is called.
	t.Cleanup(r.srv.Stop)
	r.addr = l.Addr().String()
	return r
}

// TestDialReplicasFailsOver: with several addresses the client uses the
// first, and when it dies moves to the next without a failed call; a list
// must hold TCP addresses only, and plaintext only on loopback.
func TestDialReplicasFailsOver(t *testing.T) {
	a, b := startReplicaFake(t), startReplicaFake(t)
	c, err := Dial(t.Context(), a.addr+", "+b.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	call := func() error {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		_, _, err := c.Encrypt(ctx, "t1", []Item{{Plaintext: []byte("x")}})
		return err
	}
	for range 5 {
		if err := call(); err != nil {
			t.Fatal(err)
		}
	}
	if a.calls.Load() != 5 || b.calls.Load() != 0 {
		t.Fatalf("calls a=%d b=%d, want all 5 on the first address", a.calls.Load(), b.calls.Load())
	}
	a.srv.Stop() // the replica dies
	for i := range 5 {
		if err := call(); err != nil {
			t.Fatalf("call %d after the first replica died: %v", i, err)
		}
	}
	if b.calls.Load() != 5 {
		t.Fatalf("calls on the second replica: %d, want 5", b.calls.Load())
	}

	for _, bad := range []string{a.addr + ",unix:/tmp/x.sock", a.addr + ",", a.addr + ",10.0.0.1:7443"} {
		if _, err := Dial(t.Context(), bad); err == nil || !strings.HasPrefix(err.Error(), "hsmd client: ") {
			t.Errorf("Dial(%q): %v", bad, err)
		}
	}
}
