package client

import (
	"context"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// gated is the fake's Envelope service behind a gate: each Encrypt or
// Decrypt RPC reports its arrival, then waits for a token on release, or
// for release to be closed, or for its own seen.proceed to be closed, or
// for its context.
type gated struct {
	*fake
	arrived   chan seen
	release   chan struct{}
	cancelled atomic.Int64 // RPCs whose context ended while held
	maxItem   int          // if set, a request with a larger item fails whole, as hsmd's limits do
}

// seen is an RPC as the server saw it.
type seen struct {
	items    int
	deadline time.Time // zero: none
	md       metadata.MD
	proceed  chan struct{} // close it to let this RPC go on
}

func (g *gated) hold(ctx context.Context, n int) error {
	dl, _ := ctx.Deadline()
	md, _ := metadata.FromIncomingContext(ctx)
	proceed := make(chan struct{})
	select {
	case g.arrived <- seen{n, dl, md, proceed}:
	default: // nobody is counting
	}
	select {
	case <-g.release:
		return nil
	case <-proceed:
		return nil
	case <-ctx.Done():
		g.cancelled.Add(1)
		return status.FromContextError(ctx.Err()).Err()
	}
}

func (g *gated) Encrypt(ctx context.Context, req *hsmdv1.EncryptRequest) (*hsmdv1.EncryptResponse, error) {
	if err := g.hold(ctx, len(req.Items)); err != nil {
		return nil, err
	}
	if req.Tenant == "denied" {
		return nil, status.Error(codes.PermissionDenied, "not allowed")
	}
	for i, it := range req.Items {
		if g.maxItem > 0 && len(it.Plaintext) > g.maxItem {
			return nil, status.Errorf(codes.InvalidArgument, "item %d is over the limit max_item_bytes", i)
		}
	}
	return g.fake.Encrypt(ctx, req)
}

func (g *gated) Decrypt(ctx context.Context, req *hsmdv1.DecryptRequest) (*hsmdv1.DecryptResponse, error) {
	if err := g.hold(ctx, len(req.Items)); err != nil {
		return nil, err
	}
	return g.fake.Decrypt(ctx, req)
}

// dialGated serves a gated fake and dials it with auto-batching o.
func dialGated(t *testing.T, o AutoBatchOptions) (*gated, *Client) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := &gated{fake: &fake{pageSize: 2}, arrived: make(chan seen, 1000), release: make(chan struct{})}
	srv := grpc.NewServer()
	hsmdv1.RegisterEnvelopeServer(srv, g)
	go srv.Serve(lis) //nolint:errcheck // Serve returns when Stop is called.
	t.Cleanup(srv.Stop)
	c, err := Dial(t.Context(), "unix://"+sock, WithAutoBatch(o))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return g, c
}

// next returns the next RPC to arrive at the server.
func (g *gated) next(t *testing.T) seen {
	t.Helper()
	select {
	case s := <-g.arrived:
		return s
	case <-time.After(10 * time.Second):
		t.Fatal("no RPC arrived")
		return seen{}
	}
}

// none checks that no RPC arrives within d.
func (g *gated) none(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case s := <-g.arrived:
		t.Fatalf("unexpected RPC of %d items", s.items)
	case <-time.After(d):
	}
}

// call is a single-item call run in a goroutine.
type call struct {
	out  []byte
	err  error
	done chan struct{}
}

func goCall(f func() ([]byte, error)) *call {
	c := &call{done: make(chan struct{})}
	go func() {
		c.out, c.err = f()
		close(c.done)
	}()
	return c
}

func goEncrypt(ctx context.Context, c *Client, tenant, pt string) *call {
	return goCall(func() ([]byte, error) { return c.EncryptOne(ctx, tenant, Item{Plaintext: []byte(pt)}) })
}

func (cl *call) wait(t *testing.T) *call {
	t.Helper()
	select {
	case <-cl.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the call did not return")
	}
	return cl
}

// waitQueued waits until n calls of key are queued.
func waitQueued(t *testing.T, c *Client, key batchKey, n int) {
	t.Helper()
	b := c.one.(*batcher)
	for start := time.Now(); time.Since(start) < 10*time.Second; time.Sleep(time.Millisecond) {
		b.mu.Lock()
		got := 0
		if q := b.queues[key]; q != nil && q.pending != nil {
			got = len(q.pending.ws)
		}
		b.mu.Unlock()
		if got == n {
			return
		}
	}
	t.Fatalf("%d calls were never queued", n)
}

// blockOne starts a call of tenant t1 that the gate holds, so that with
// MaxInFlight 1 the next calls queue.
func blockOne(t *testing.T, g *gated, c *Client) *call {
	t.Helper()
	a := goEncrypt(t.Context(), c, "t1", "a")
	if s := g.next(t); s.items != 1 {
		t.Fatalf("the first call's RPC has %d items", s.items)
	}
	return a
}
