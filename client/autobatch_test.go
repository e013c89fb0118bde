package client

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/softhsm"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// realServer is a whole hsmd in process on a real SoftHSM token, served on
// a unix socket, with a counter of the envelope RPCs it answered.
type realServer struct {
	sock string
	rpcs rpcCounter
}

// rpcCounter counts Encrypt and Decrypt RPCs and their items.
type rpcCounter struct {
	encrypts, decrypts, items, maxItems atomic.Int64
}

func (c *rpcCounter) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	var n int
	switch r := req.(type) {
	case *hsmdv1.EncryptRequest:
		c.encrypts.Add(1)
		n = len(r.Items)
	case *hsmdv1.DecryptRequest:
		c.decrypts.Add(1)
		n = len(r.Items)
	}
	c.items.Add(int64(n))
	for m := c.maxItems.Load(); int64(n) > m && !c.maxItems.CompareAndSwap(m, int64(n)); m = c.maxItems.Load() {
	}
	return h(ctx, req)
}

func (c *rpcCounter) reset() {
	c.encrypts.Store(0)
	c.decrypts.Store(0)
	c.items.Store(0)
	c.maxItems.Store(0)
}

// startReal starts hsmd with limits on a fresh SoftHSM token, with the
// tenants "alpha" and "beta".
func startReal(t testing.TB, limits server.Limits) *realServer {
	t.Helper()
	ctx := context.Background()
	tok := softhsm.NewTestToken(t)
	h, err := hsm.Open(ctx, hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, CallTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	st, err := bolt.Open(filepath.Join(dir, "hsmd.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var eng *envelope.Engine
	m := server.NewMetrics(prometheus.NewRegistry(), func() envelope.Stats { return eng.Stats() })
	if eng, err = envelope.New(envelope.Config{Deriver: h}); err != nil {
		t.Fatal(err)
	}
	// As the daemon does: decoded tenants are cached.
	srv, err := server.New(server.Config{Store: store.NewCached(st), Engine: eng, Metrics: m, Limits: limits, Ready: h.Ready})
	if err != nil {
		t.Fatal(err)
	}
	rs := &realServer{sock: filepath.Join(dir, "hsmd.sock")}
	g := grpc.NewServer(append(srv.ServerOptions(), grpc.ChainUnaryInterceptor(rs.rpcs.intercept))...)
	srv.Register(g)
	lis, err := net.Listen("unix", rs.sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(lis) //nolint:errcheck // Serve returns when Stop is called.
	t.Cleanup(func() {
		g.Stop()
		st.Close()
		if err := h.Close(); err != nil {
			t.Errorf("closing the HSM: %v", err)
		}
		if n := h.OpenSessions(); n != 0 {
			t.Errorf("%d PKCS#11 sessions left open", n)
		}
	})
	c := rs.dial(t, WithAutoBatch(AutoBatchOptions{Disabled: true}))
	for _, name := range []string{"alpha", "beta"} {
		if _, err := c.CreateTenant(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	return rs
}

func (rs *realServer) dial(t testing.TB, opts ...Option) *Client {
	t.Helper()
	c, err := Dial(context.Background(), "unix://"+rs.sock, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestAutoBatchRealServer round-trips single items from many goroutines
// through hsmd on SoftHSM, for two tenants: each caller gets its own
// plaintext back, calls were coalesced, and a tampered ciphertext in a
// coalesced batch fails only its caller.
func TestAutoBatchRealServer(t *testing.T) {
	rs := startReal(t, server.Limits{})
	c := rs.dial(t)
	ctx := t.Context()
	const goroutines, each = 64, 40
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			tenant := []string{"alpha", "beta"}[g%2]
			for i := range each {
				pt := fmt.Appendf(nil, "record %d/%d", g, i)
				aad := map[string]string{"row": fmt.Sprint(g, i)}
				ct, err := c.EncryptOne(ctx, tenant, Item{Plaintext: pt, Context: aad})
				if err != nil {
					t.Errorf("EncryptOne: %v", err)
					return
				}
				if i%5 == 0 { // a tampered copy, decrypted among good ones
					bad := slices.Clone(ct)
					bad[len(bad)-1] ^= 1
					if _, err := c.DecryptOne(ctx, tenant, CiphertextItem{Ciphertext: bad, Context: aad}); err != ErrDecrypt {
						t.Errorf("tampered item: %v, want exactly ErrDecrypt", err)
					}
				}
				got, err := c.DecryptOne(ctx, tenant, CiphertextItem{Ciphertext: ct, Context: aad})
				if err != nil || !bytes.Equal(got, pt) {
					t.Errorf("round trip of %q: %q, %v", pt, got, err)
				}
			}
		})
	}
	wg.Wait()
	calls := int64(goroutines * each)
	enc, dec := rs.rpcs.encrypts.Load(), rs.rpcs.decrypts.Load()
	t.Logf("%d EncryptOne calls in %d RPCs, %d DecryptOne calls in %d RPCs, at most %d items per RPC",
		calls, enc, calls+calls/5, dec, rs.rpcs.maxItems.Load())
	if enc >= calls || dec >= calls+calls/5 || rs.rpcs.maxItems.Load() < 2 {
		t.Errorf("no coalescing: %d Encrypt and %d Decrypt RPCs for %d and %d calls", enc, dec, calls, calls+calls/5)
	}
	if got := rs.rpcs.items.Load(); got != 2*calls+calls/5 {
		t.Errorf("the server saw %d items, want %d", got, 2*calls+calls/5)
	}
}

// TestAutoBatchDisabledRealServer: with auto-batching off, each call is
// one RPC.
func TestAutoBatchDisabledRealServer(t *testing.T) {
	rs := startReal(t, server.Limits{})
	c := rs.dial(t, WithAutoBatch(AutoBatchOptions{Disabled: true}))
	const goroutines, each = 32, 10
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				if _, err := c.EncryptOne(t.Context(), "alpha", Item{Plaintext: fmt.Appendf(nil, "%d/%d", g, i)}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if n := rs.rpcs.encrypts.Load(); n != goroutines*each || rs.rpcs.maxItems.Load() != 1 {
		t.Errorf("%d RPCs of up to %d items for %d calls, want one RPC per call", n, rs.rpcs.maxItems.Load(), goroutines*each)
	}
}

// TestAutoBatchServerLimitRealServer: an item over the server's
// max_item_bytes fails alone, although the server refuses whole requests.
func TestAutoBatchServerLimitRealServer(t *testing.T) {
	rs := startReal(t, server.Limits{MaxItemBytes: 100})
	c := rs.dial(t)
	var wg sync.WaitGroup
	var rejected atomic.Int64
	for g := range 64 {
		wg.Go(func() {
			for i := range 20 {
				size := 10
				if i == 7 && g%8 == 0 {
					size = 101
				}
				_, err := c.EncryptOne(t.Context(), "alpha", Item{Plaintext: make([]byte, size)})
				switch {
				case size > 100 && status.Code(err) == codes.InvalidArgument:
					rejected.Add(1)
				case size > 100:
					t.Errorf("over the limit: %v, want InvalidArgument", err)
				case err != nil:
					t.Errorf("within the limit: %v", err)
				}
			}
		})
	}
	wg.Wait()
	if rejected.Load() != 8 {
		t.Errorf("%d items rejected, want 8", rejected.Load())
	}
}

// BenchmarkAutoBatch64 runs 64 goroutines of single-item 1 KiB EncryptOne
// calls over the unix socket against hsmd on SoftHSM in the same process,
// with auto-batching on and off; items/rpc is the mean batch size and
// cpu-µs/item the CPU time of the whole process (client and server) per
// item. manual-2x32 is the reference: 64 items outstanding in two
// goroutines of hand-made 32-item Encrypt batches.
func BenchmarkAutoBatch64(b *testing.B) {
	rs := startReal(b, server.Limits{})
	for _, mode := range []struct {
		name string
		opts AutoBatchOptions
	}{{"on", AutoBatchOptions{}}, {"off", AutoBatchOptions{Disabled: true}}} {
		b.Run(mode.name, func(b *testing.B) {
			c := rs.dial(b, WithAutoBatch(mode.opts))
			if _, err := c.EncryptOne(context.Background(), "alpha", Item{Plaintext: make([]byte, 1024)}); err != nil {
				b.Fatal(err) // warm: derive the key, connect
			}
			rs.rpcs.reset()
			b.SetParallelism(max(1, 64/runtime.GOMAXPROCS(0)))
			b.ReportAllocs()
			b.ResetTimer()
			cpu := cpuTime()
			b.RunParallel(func(pb *testing.PB) {
				pt := make([]byte, 1024)
				for pb.Next() {
					if _, err := c.EncryptOne(context.Background(), "alpha", Item{Plaintext: pt}); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "items/s")
			b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/float64(b.N), "cpu-µs/item")
			if n := rs.rpcs.encrypts.Load(); n > 0 {
				b.ReportMetric(float64(rs.rpcs.items.Load())/float64(n), "items/rpc")
			}
		})
	}
	b.Run("manual-2x32", func(b *testing.B) {
		c := rs.dial(b)
		items := make([]Item, 32)
		for i := range items {
			items[i].Plaintext = make([]byte, 1024)
		}
		b.SetParallelism(max(1, 2/runtime.GOMAXPROCS(0)))
		b.ResetTimer()
		cpu := cpuTime()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := c.Encrypt(context.Background(), "alpha", items); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(len(items)*b.N)/b.Elapsed().Seconds(), "items/s")
		b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/float64(len(items)*b.N), "cpu-µs/item")
	})
}

// BenchmarkAutoBatchLatency times one goroutine's single-item 1 KiB
// EncryptOne calls, one after another, with auto-batching on and off: a
// lone caller must not pay for batching.
func BenchmarkAutoBatchLatency(b *testing.B) {
	rs := startReal(b, server.Limits{})
	for _, mode := range []struct {
		name string
		opts AutoBatchOptions
	}{{"on", AutoBatchOptions{}}, {"off", AutoBatchOptions{Disabled: true}}} {
		b.Run(mode.name, func(b *testing.B) {
			c := rs.dial(b, WithAutoBatch(mode.opts))
			pt := make([]byte, 1024)
			if _, err := c.EncryptOne(context.Background(), "alpha", Item{Plaintext: pt}); err != nil {
				b.Fatal(err)
			}
			lat := make([]time.Duration, 0, 1<<16)
			b.ReportAllocs()
			for b.Loop() {
				start := time.Now()
				if _, err := c.EncryptOne(context.Background(), "alpha", Item{Plaintext: pt}); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
		})
	}
}

// cpuTime is the CPU time the process has used (client and server).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
