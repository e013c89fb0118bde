package audit

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/transparency-dev/formats/log"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/signing"
	"github.com/hsmd/hsmd/softhsm"
)

// benchAppenders is the number of concurrent appenders of the parallel
// benchmarks: hsmd's data plane with 64 calls in flight.
const benchAppenders = 64

// benchEntries makes entries like the server's record of an Encrypt call:
// kind rpc, a caller, a tenant, a 16-hex-digit request ID, two items under
// two distinct contexts (their HMACs under a context key), code OK.
type benchEntries struct {
	next     atomic.Uint64
	contexts []string
}

func newBenchEntries(b *testing.B) *benchEntries {
	b.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	h, err := NewContextHasher(key)
	if err != nil {
		b.Fatal(err)
	}
	return &benchEntries{contexts: []string{h.Sum([]byte("\x00\x00\x00\x03app\x00\x00\x00\x07billing")),
		h.Sum([]byte("\x00\x00\x00\x03app\x00\x00\x00\x07payroll"))}}
}

func (m *benchEntries) entry() Entry {
	return Entry{Kind: KindRPC, RequestID: fmt.Sprintf("%016x", m.next.Add(1)), Caller: "uid:1000",
		Method: "Encrypt", Tenant: "bench-tenant", KeyVersions: []uint32{1}, Items: 2, Code: "OK",
		Contexts: m.contexts}
}

// openBenchLog opens a log in a temp dir with hsmd's defaults (batches of
// up to 1024, DefaultCheckpointInterval) and software signers, and
// counts its batch writes and their time in w.
func openBenchLog(b *testing.B, w *writeStats) *Log {
	b.Helper()
	signers, _ := softSigners(b)
	l, err := Open(context.Background(), Config{Dir: b.TempDir(), Signers: signers,
		OnWrite: func(_ int, d time.Duration, _ error) { w.n.Add(1); w.d.Add(int64(d)) }})
	if err != nil {
		b.Fatal(err)
	}
	return l
}

// writeStats counts a Log's batch writes and their total duration.
type writeStats struct{ n, d atomic.Int64 }

func (w *writeStats) reset() { w.n.Store(0); w.d.Store(0) }

// runAppenders makes b.N calls of op spread over n goroutines and returns
// the latency of each call. (b.RunParallel cannot run fewer goroutines
// than GOMAXPROCS, nor exactly n on every machine.)
func runAppenders(b *testing.B, n int, op func() error) []time.Duration {
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
				if err := op(); err != nil {
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

// reportAppends reports entries/s over the timed phase, entries per batch
// write, the mean time of a batch write, and the p50 and p99 of the calls'
// latencies.
func reportAppends(b *testing.B, entries int, w *writeStats, lat []time.Duration) {
	n := max(w.n.Load(), 1)
	b.ReportMetric(float64(entries)/b.Elapsed().Seconds(), "entries/s")
	b.ReportMetric(float64(entries)/float64(n), "entries/write")
	b.ReportMetric(float64(w.d.Load())/float64(n)/1e3, "µs/write")
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2])/1e3, "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100])/1e3, "p99-µs")
}

// BenchmarkAppendBatched: entries/s sustained by 64 appenders in batched
// mode (Append returns once queued). The timer runs until the last entry
// is durable (a final durable append, which the single writer orders after
// all of them), so the figure is the writer's, not the queue's.
func BenchmarkAppendBatched(b *testing.B) {
	var w writeStats
	l := openBenchLog(b, &w)
	m := newBenchEntries(b)
	ctx := context.Background()
	b.ResetTimer()
	w.reset()
	lat := runAppenders(b, benchAppenders, func() error { return l.Append(ctx, m.entry(), false) })
	if err := l.Append(ctx, m.entry(), true); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	reportAppends(b, b.N+1, &w, lat)
	closeLog(b, l)
}

// BenchmarkAppendDurable: every appender waits until its entry is durable,
// with 1 and 64 appenders. With one, each entry is a batch write of its
// own (an fsync'd tessera flush); with 64, the writer takes whatever
// queued during the previous write as one batch (group commit), so
// entries/s grows while the latency per append stays near one write.
func BenchmarkAppendDurable(b *testing.B) {
	for _, n := range []int{1, benchAppenders} {
		b.Run(fmt.Sprintf("appenders=%d", n), func(b *testing.B) {
			var w writeStats
			l := openBenchLog(b, &w)
			m := newBenchEntries(b)
			ctx := context.Background()
			b.ResetTimer()
			w.reset()
			lat := runAppenders(b, n, func() error { return l.Append(ctx, m.entry(), true) })
			b.StopTimer()
			reportAppends(b, b.N, &w, lat)
			closeLog(b, l)
		})
	}
}

// benchHSMSigners opens a fresh SoftHSM token, makes and loads its keys,
// and returns note signers over its Ed25519 and ECDSA P-256 keys named
// testOrigin, as hsmd signs its checkpoints.
func benchHSMSigners(b *testing.B) (ed, ec note.Signer) {
	b.Helper()
	ctx := context.Background()
	tok := softhsm.NewTestToken(b)
	h, err := hsm.Open(ctx, hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile})
	if err != nil {
		b.Fatalf("hsm.Open: %v", err)
	}
	b.Cleanup(func() {
		if err := h.Close(); err != nil {
			b.Errorf("closing the HSM: %v", err)
		}
		if n := h.OpenSessions(); n != 0 {
			b.Errorf("%d PKCS#11 sessions left open after Close", n)
		}
	})
	if err := h.InitKeys(ctx); err != nil {
		b.Fatalf("InitKeys: %v", err)
	}
	if err := h.LoadKeys(ctx); err != nil {
		b.Fatalf("LoadKeys: %v", err)
	}
	var out [2]note.Signer
	for i, alg := range []hsm.SignAlg{hsm.Ed25519, hsm.ECDSAP256} {
		cs, err := h.Signer(ctx, alg)
		if err != nil {
			b.Fatal(err)
		}
		if out[i], err = signing.NewNoteSigner(testOrigin, cs); err != nil {
			b.Fatal(err)
		}
	}
	return out[0], out[1]
}

// BenchmarkCheckpointSign: the cost of signing one checkpoint (note.Sign
// over a checkpoint body), per signer and with hsmd's three together: the
// token's Ed25519 and ECDSA P-256 keys through SoftHSM, and the software
// ML-DSA-44 key. The software Ed25519 and ECDSA signers show what PKCS#11
// and SoftHSM add; all+archive adds the archiving of the signed note (a
// write and an fsync of the checkpoints file), as a publishing Log does.
func BenchmarkCheckpointSign(b *testing.B) {
	ed, ec := benchHSMSigners(b)
	soft, _ := softSigners(b) // Ed25519, ECDSA P-256, ML-DSA-44
	ml := soft[2]
	root := sha256.Sum256([]byte("root"))
	text := string(log.Checkpoint{Origin: testOrigin, Size: 1 << 20, Hash: root[:]}.Marshal())
	cases := []struct {
		name    string
		signers []note.Signer
	}{
		{"ed25519-hsm", []note.Signer{ed}},
		{"ecdsa-p256-hsm", []note.Signer{ec}},
		{"mldsa44", []note.Signer{ml}},
		{"all", []note.Signer{ed, ec, ml}},
		{"ed25519-soft", soft[:1]},
		{"ecdsa-p256-soft", soft[1:2]},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := note.Sign(&note.Note{Text: text}, c.signers...); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("all+archive", func(b *testing.B) {
		a, err := openArchive(filepath.Join(b.TempDir(), CheckpointsFile))
		if err != nil {
			b.Fatal(err)
		}
		defer a.close()
		signers := a.capture([]note.Signer{ed, ec, ml})
		for b.Loop() {
			if _, err := note.Sign(&note.Note{Text: text}, signers...); err != nil {
				b.Fatal(err)
			}
		}
	})
}
