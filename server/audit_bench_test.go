package server_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// BenchmarkEncryptAudit measures what the audit log adds to a single-item
// Encrypt of 1 KiB over the unix socket, client and server in one process
// on a real SoftHSM token: with no audit log, with batched entries (the
// reply does not wait for the entry) and with audit.sync (every reply waits
// until its entry is durable). callers=1 makes one call after another and
// reports the p50 latency; callers=64 keeps 64 calls in flight on one
// connection and reports calls/s (and the p50 under that load).
func BenchmarkEncryptAudit(b *testing.B) {
	modes := []struct {
		name string
		o    stackOpts
	}{
		{"audit=off", stackOpts{}},
		{"audit=batched", stackOpts{audit: true}},
		{"audit=sync", stackOpts{audit: true, auditSync: true}},
	}
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) {
			s := newStack(b, m.o)
			s.createTenant("bench")
			req := &hsmdv1.EncryptRequest{Tenant: "bench", Items: []*hsmdv1.EncryptItem{{Plaintext: make([]byte, 1024)}}}
			rand.Read(req.Items[0].Plaintext)
			call := func() error { _, err := s.env.Encrypt(context.Background(), req); return err }
			if err := call(); err != nil { // warm: derive the key, open the connection
				b.Fatal(err)
			}
			for _, n := range []int{1, 64} {
				b.Run(fmt.Sprintf("callers=%d", n), func(b *testing.B) {
					lat := callConcurrently(b, n, call)
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
					slices.Sort(lat)
					b.ReportMetric(float64(lat[len(lat)/2])/1e3, "p50-µs")
					b.ReportMetric(float64(lat[len(lat)*99/100])/1e3, "p99-µs")
				})
			}
		})
	}
}

// callConcurrently makes b.N calls of call spread over n goroutines and
// returns the latency of each. (b.RunParallel cannot run fewer goroutines
// than GOMAXPROCS, nor exactly n on every machine.)
func callConcurrently(b *testing.B, n int, call func() error) []time.Duration {
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(len(lat)) {
					return
				}
				start := time.Now()
				if err := call(); err != nil {
					b.Error(err)
					return
				}
				lat[i] = time.Since(start)
			}
		})
	}
	wg.Wait()
	return lat
}
