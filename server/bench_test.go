package server_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// BenchmarkGRPC measures batches of 1,000 items over the unix socket and
// loopback TCP, client and server in one process on a real SoftHSM token.
// items/s = 1000 / (sec/op); MB/s counts plaintext bytes. hsm-calls/1k-items
// is the steady state (the first derivation happens before the timer).
func BenchmarkGRPC(b *testing.B) {
	s := newStack(b, stackOpts{})
	s.createTenant("bench")
	for _, transport := range []string{"unix", "tcp"} {
		conn := s.conn
		if transport == "tcp" {
			conn = s.tcp
		}
		env := hsmdv1.NewEnvelopeClient(conn)
		for _, size := range []int{64, 1024, 16 << 10} {
			items := make([]*hsmdv1.EncryptItem, 1000)
			for i := range items {
				items[i] = &hsmdv1.EncryptItem{Plaintext: make([]byte, size)}
				rand.Read(items[i].Plaintext)
			}
			req := &hsmdv1.EncryptRequest{Tenant: "bench", Items: items}
			b.Run(fmt.Sprintf("%s/encrypt/%dB", transport, size), func(b *testing.B) {
				benchBatch(b, s, len(items), size, func() error { _, err := env.Encrypt(context.Background(), req); return err })
			})
			resp, err := env.Encrypt(context.Background(), req)
			if err != nil {
				b.Fatal(err)
			}
			dreq := &hsmdv1.DecryptRequest{Tenant: "bench"}
			for _, ct := range resp.Ciphertexts {
				dreq.Items = append(dreq.Items, &hsmdv1.DecryptItem{Ciphertext: ct})
			}
			b.Run(fmt.Sprintf("%s/decrypt/%dB", transport, size), func(b *testing.B) {
				benchBatch(b, s, len(items), size, func() error { _, err := env.Decrypt(context.Background(), dreq); return err })
			})
		}
		b.Run(transport+"/single-item-latency", func(b *testing.B) { benchLatency(b, conn) })
	}
}

func benchBatch(b *testing.B, s *stack, n, size int, call func() error) {
	if err := call(); err != nil { // warm: derive the key, open connections
		b.Fatal(err)
	}
	before := s.hsmCalls()
	b.SetBytes(int64(n * size))
	b.ReportAllocs()
	cpu0 := cpuTime()
	for b.Loop() {
		if err := call(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/1e3/float64(n*b.N), "cpu-µs/item")
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "items/s")
	b.ReportMetric((s.hsmCalls()-before)*1000/float64(n*b.N), "hsm-calls/1k-items")
}

// benchLatency times single-item Encrypt calls one after another and
// reports their p50 and p99.
func benchLatency(b *testing.B, conn *grpc.ClientConn) {
	env := hsmdv1.NewEnvelopeClient(conn)
	req := &hsmdv1.EncryptRequest{Tenant: "bench", Items: []*hsmdv1.EncryptItem{{Plaintext: make([]byte, 1024)}}}
	if _, err := env.Encrypt(context.Background(), req); err != nil {
		b.Fatal(err)
	}
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		if _, err := env.Encrypt(context.Background(), req); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkRewrap moves batches of 1,000 items of 1 KiB from version 1 to
// version 2 over the unix socket (the inputs stay under version 1, so
// every iteration opens and seals all of them).
func BenchmarkRewrap(b *testing.B) {
	s := newStack(b, stackOpts{})
	s.createTenant("bench")
	items := make([]*hsmdv1.EncryptItem, 1000)
	for i := range items {
		items[i] = &hsmdv1.EncryptItem{Plaintext: make([]byte, 1024)}
	}
	resp, err := s.env.Encrypt(context.Background(), &hsmdv1.EncryptRequest{Tenant: "bench", Items: items})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := s.keys.RotateKey(context.Background(), &hsmdv1.RotateKeyRequest{Tenant: "bench"}); err != nil {
		b.Fatal(err)
	}
	req := &hsmdv1.RewrapRequest{Tenant: "bench"}
	for _, ct := range resp.Ciphertexts {
		req.Items = append(req.Items, &hsmdv1.DecryptItem{Ciphertext: ct})
	}
	benchBatch(b, s, len(items), 1024, func() error {
		r, err := s.env.Rewrap(context.Background(), req)
		if err == nil && (r.KeyVersion != 2 || r.Results[0].Error != nil) {
			err = fmt.Errorf("rewrap: version %d, %v", r.KeyVersion, r.Results[0].Error)
		}
		return err
	})
}

// cpuTime is the process's user and system CPU time so far. Other
// processes on a shared machine do not count in it, so cpu-µs/item is
// steadier than items/s; client and server (one process) count together.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkGRPCParallel sends batches of 1,000 items of 1 KiB over the unix
// socket from 1, 2 and 4 callers at once (one connection), so that client
// and server use both cores.
func BenchmarkGRPCParallel(b *testing.B) {
	s := newStack(b, stackOpts{})
	s.createTenant("bench")
	items := make([]*hsmdv1.EncryptItem, 1000)
	for i := range items {
		items[i] = &hsmdv1.EncryptItem{Plaintext: make([]byte, 1024)}
		rand.Read(items[i].Plaintext)
	}
	req := &hsmdv1.EncryptRequest{Tenant: "bench", Items: items}
	resp, err := s.env.Encrypt(context.Background(), req)
	if err != nil {
		b.Fatal(err)
	}
	dreq := &hsmdv1.DecryptRequest{Tenant: "bench"}
	for _, ct := range resp.Ciphertexts {
		dreq.Items = append(dreq.Items, &hsmdv1.DecryptItem{Ciphertext: ct})
	}
	for _, op := range []string{"encrypt", "decrypt"} {
		call := func() error { _, err := s.env.Encrypt(context.Background(), req); return err }
		if op == "decrypt" {
			call = func() error { _, err := s.env.Decrypt(context.Background(), dreq); return err }
		}
		for _, callers := range []int{1, 2, 4} {
			b.Run(fmt.Sprintf("%s/callers=%d", op, callers), func(b *testing.B) {
				before := s.hsmCalls()
				b.SetBytes(int64(len(items) * 1024))
				b.ReportAllocs()
				cpu0 := cpuTime()
				var wg sync.WaitGroup
				var done atomic.Int64
				start := time.Now()
				for range callers {
					wg.Go(func() {
						for done.Add(1) <= int64(b.N) {
							if err := call(); err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
				el := time.Since(start)
				b.ReportMetric(float64(cpuTime()-cpu0)/1e3/float64(len(items)*b.N), "cpu-µs/item")
				b.ReportMetric(float64(len(items)*b.N)/el.Seconds(), "items/s")
				b.ReportMetric((s.hsmCalls()-before)*1000/float64(len(items)*b.N), "hsm-calls/1k-items")
			})
		}
	}
}
