package soak_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/internal/grpccodec"
)

// envSoakDuration selects the long form (`make soak DURATION=10m`).
const envSoakDuration = "HSMD_SOAK_DURATION"

// Growth bounds, checked on every sample after the warm-up against the
// baseline (the first sample after it):
const (
	// maxGoroutineGrowth: goroutines may not grow by more than this.
	maxGoroutineGrowth = 25
	// maxFDGrowth: open file descriptors may not grow by more than this.
	maxFDGrowth = 10
	// maxHeapGrowth: the Go heap in use may not grow by more than this.
	maxHeapGrowth = 64 << 20
	// maxRSSGrowth: RSS may not grow by more than this or half the
	// baseline, whichever is more.
	maxRSSGrowth = 64 << 20
)

// Open PKCS#11 sessions may never exceed the pool (soakSessions), and are
// 0 after Close (checked by the stack's stop).

const (
	soakTenants = 8
	soakWorkers = 4
	soakBatch   = 64
	soakItem    = 256 // plaintext bytes
	soakRing    = 1024
)

// sample is one observation of the process.
type sample struct {
	at              time.Duration
	rss, heap       uint64 // bytes
	goroutines, fds int
	sessions        int
	items           int64 // items encrypted and decrypted so far
	rotations       int64 // key rotations so far
	stats           envelope.Stats
}

// TestSoak drives the in-process hsmd at full load (encrypt and decrypt
// batches from soakWorkers goroutines, a rotation every 2s) for 15s, or
// HSMD_SOAK_DURATION, sampling every second (every 5s in the long form),
// and fails on growth beyond the bounds above after the warm-up (a third
// of the short form, a tenth of the long one, at least 5s). Every call
// must succeed. It logs a summary table.
func TestSoak(t *testing.T) {
	total, every := 15*time.Second, time.Second
	if v := os.Getenv(envSoakDuration); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("%s=%q is not a positive duration", envSoakDuration, v)
		}
		total, every = d, 5*time.Second
	}
	warm := max(5*time.Second, total/10)
	if total <= 15*time.Second {
		warm = total / 3
	}
	s := newStack(t)
	ctx := context.Background()
	tenants := make([]string, soakTenants)
	for i := range tenants {
		tenants[i] = fmt.Sprintf("soak-%d", i)
		if _, err := s.ten.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: tenants[i]}); err != nil {
			t.Fatal(err)
		}
	}
	l := &load{s: s, tenants: tenants, stop: make(chan struct{})}
	start := time.Now()
	l.run()
	samples := []sample{l.sample(0)}
	tick := time.NewTicker(every)
	for time.Since(start) < total {
		<-tick.C
		samples = append(samples, l.sample(time.Since(start)))
	}
	tick.Stop()
	l.halt()
	samples = append(samples, l.sample(time.Since(start)))
	s.stop()

	report(t, samples, warm, every)
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d calls failed under load (first: %v)", n, l.firstErr.Load())
	}
	checkBounds(t, samples, warm)
	if n := grpccodec.Pending(); n != 0 {
		t.Errorf("%d Encrypt responses sealed in advance were neither sent nor released", n)
	}
}

// load is the work the soak runs.
type load struct {
	s        *stack
	tenants  []string
	stop     chan struct{}
	wg       sync.WaitGroup
	items    atomic.Int64
	rotated  atomic.Int64
	failed   atomic.Int64
	firstErr atomic.Value
}

func (l *load) run() {
	for w := range soakWorkers {
		l.wg.Go(func() { l.worker(uint64(w)) })
	}
	l.wg.Go(l.rotator)
}

func (l *load) halt() {
	close(l.stop)
	l.wg.Wait()
}

func (l *load) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (l *load) fail(err error) {
	l.failed.Add(1)
	l.firstErr.CompareAndSwap(nil, err.Error())
}

// worker encrypts a batch, then decrypts a batch drawn from the last
// soakRing items it encrypted, and checks the plaintexts.
type ringItem struct{ pt, ct []byte }

func (l *load) worker(w uint64) {
	rng := rand.New(rand.NewPCG(w, 1))
	ring := make([]ringItem, 0, soakRing)
	next := 0
	ctx := context.Background()
	for n := 0; !l.stopped(); n++ {
		tenant := l.tenants[rng.IntN(len(l.tenants))]
		items := make([]*hsmdv1.EncryptItem, soakBatch)
		for i := range items {
			pt := make([]byte, soakItem)
			for j := range pt {
				pt[j] = byte(rng.Uint32())
			}
			items[i] = &hsmdv1.EncryptItem{Plaintext: pt}
		}
		resp, err := l.s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: tenant, Items: items})
		if err != nil {
			l.fail(err)
			continue
		}
		for i, it := range items {
			r := ringItem{it.Plaintext, resp.Ciphertexts[i]}
			if len(ring) < soakRing {
				ring = append(ring, r)
			} else {
				ring[next] = r
				next = (next + 1) % soakRing
			}
		}
		dec := make([]*hsmdv1.DecryptItem, soakBatch)
		want := make([][]byte, soakBatch)
		for i := range dec {
			r := ring[rng.IntN(len(ring))]
			dec[i], want[i] = &hsmdv1.DecryptItem{Ciphertext: r.ct}, r.pt
		}
		dr, err := l.s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Items: dec})
		if err != nil {
			l.fail(err)
			continue
		}
		for i, r := range dr.Results {
			if r.Error != nil || !bytes.Equal(r.Plaintext, want[i]) {
				l.fail(fmt.Errorf("decrypt: wrong or failed item: %v", r.Error))
			}
		}
		l.items.Add(2 * soakBatch)
	}
}

func (l *load) rotator() {
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-l.stop:
			return
		case <-tick.C:
		}
		if _, err := l.s.keys.RotateKey(context.Background(), &hsmdv1.RotateKeyRequest{Tenant: l.tenants[i%len(l.tenants)]}); err != nil {
			l.fail(err)
			continue
		}
		l.rotated.Add(1)
	}
}

func (l *load) sample(at time.Duration) sample {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return sample{
		at: at, rss: rss(), heap: ms.HeapInuse, goroutines: runtime.NumGoroutine(), fds: openFDs(),
		sessions: l.s.hsm.OpenSessions(), items: l.items.Load(), rotations: l.rotated.Load(), stats: l.s.eng.Stats(),
	}
}

// rss reads VmRSS from /proc/self/status, in bytes.
func rss() uint64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// openFDs counts /proc/self/fd (the directory read itself holds one).
func openFDs() int {
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(es)
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func hitRate(hits, misses uint64) float64 {
	if hits+misses == 0 {
		return 0
	}
	return 100 * float64(hits) / float64(hits+misses)
}

// report logs the samples as a table (at most about 40 rows) and the
// growth after the warm-up.
func report(t *testing.T, ss []sample, warm, every time.Duration) {
	var b strings.Builder
	fmt.Fprintf(&b, "soak: %v at full load, a sample every %v, warm-up %v\n", ss[len(ss)-1].at.Round(time.Second), every, warm)
	fmt.Fprintf(&b, "%8s %8s %8s %6s %5s %4s %10s %8s %7s %7s %6s %6s\n", "t", "RSS MiB", "heap MiB", "gorout", "sess", "fds", "items/s", "derives", "seal%", "open%", "sealC", "openC")
	step := max(1, len(ss)/40)
	for i, s := range ss {
		if i%step != 0 && i != len(ss)-1 {
			continue
		}
		rate := 0.0
		if i > 0 && s.at-ss[i-1].at >= every/2 {
			rate = float64(s.items-ss[i-1].items) / (s.at - ss[i-1].at).Seconds()
		}
		st := s.stats
		fmt.Fprintf(&b, "%8s %8.1f %8.1f %6d %5d %4d %10.0f %8d %7.1f %7.1f %6d %6d\n", s.at.Round(time.Second), mib(s.rss), mib(s.heap),
			s.goroutines, s.sessions, s.fds, rate, st.Derivations, hitRate(st.SealHits, st.SealMisses), hitRate(st.OpenHits, st.OpenMisses),
			st.SealCached, st.OpenCached)
	}
	if base, ok := baseline(ss, warm); ok {
		last := ss[len(ss)-1]
		peak := peakAfter(ss, warm)
		fmt.Fprintf(&b, "growth after warm-up (baseline at %v → peak / end): RSS %+.1f / %+.1f MiB (bound %+.1f), heap %+.1f / %+.1f MiB (bound %+.0f), goroutines %+d / %+d (bound %+d), fds %+d / %+d (bound %+d), sessions max %d (bound %d)\n",
			base.at.Round(time.Second),
			mib(peak.rss)-mib(base.rss), mib(last.rss)-mib(base.rss), mib(rssBound(base)),
			mib(peak.heap)-mib(base.heap), mib(last.heap)-mib(base.heap), mib(maxHeapGrowth),
			peak.goroutines-base.goroutines, last.goroutines-base.goroutines, maxGoroutineGrowth,
			peak.fds-base.fds, last.fds-base.fds, maxFDGrowth, peak.sessions, soakSessions)
		fmt.Fprintf(&b, "items: %d (%.0f/s); HSM derivations: %d (%d errors); rotations: %d; DEK caches (sealC, openC) end at %d and %d entries (bounds: tenants + rotations + 1 = %d, and %d each)\n",
			last.items, float64(last.items)/last.at.Seconds(), last.stats.Derivations, last.stats.DeriveErrors, last.rotations,
			last.stats.SealCached, last.stats.OpenCached, soakTenants+last.rotations+1, envelope.DefaultCacheSize)
	}
	t.Log(b.String())
}

func rssBound(base sample) uint64 { return max(maxRSSGrowth, base.rss/2) }

// baseline is the first sample at or after the warm-up.
func baseline(ss []sample, warm time.Duration) (sample, bool) {
	for _, s := range ss {
		if s.at >= warm {
			return s, true
		}
	}
	return sample{}, false
}

// peakAfter is the largest value of each field after the warm-up.
func peakAfter(ss []sample, warm time.Duration) sample {
	var p sample
	for _, s := range ss {
		if s.at < warm {
			continue
		}
		p.rss, p.heap = max(p.rss, s.rss), max(p.heap, s.heap)
		p.goroutines, p.fds, p.sessions = max(p.goroutines, s.goroutines), max(p.fds, s.fds), max(p.sessions, s.sessions)
	}
	return p
}

func checkBounds(t *testing.T, ss []sample, warm time.Duration) {
	for _, s := range ss {
		if s.sessions > soakSessions {
			t.Errorf("at %v: %d PKCS#11 sessions open, the pool has %d", s.at, s.sessions, soakSessions)
		}
		// The sealing cache holds one entry per tenant version that was
		// current (soakTenants, one more per rotation, plus the one the
		// rotator may have made but not yet counted), never more than its
		// size; the opening cache one per seed, never more than its.
		st := s.stats
		if st.SealCached > min(envelope.DefaultCacheSize, soakTenants+int(s.rotations)+1) || st.OpenCached > envelope.DefaultCacheSize {
			t.Errorf("at %v: DEK caches hold %d (sealing) and %d (opening) entries after %d rotations of %d tenants", s.at, st.SealCached, st.OpenCached, s.rotations, soakTenants)
		}
	}
	base, ok := baseline(ss, warm)
	if !ok {
		t.Fatal("no sample after the warm-up")
	}
	for _, s := range ss {
		if s.at < warm {
			continue
		}
		switch {
		case s.goroutines > base.goroutines+maxGoroutineGrowth:
			t.Errorf("at %v: %d goroutines, %d at the baseline (bound +%d)", s.at, s.goroutines, base.goroutines, maxGoroutineGrowth)
		case s.fds > base.fds+maxFDGrowth:
			t.Errorf("at %v: %d open descriptors, %d at the baseline (bound +%d)", s.at, s.fds, base.fds, maxFDGrowth)
		case s.heap > base.heap+maxHeapGrowth:
			t.Errorf("at %v: heap %.1f MiB, %.1f at the baseline (bound +%.0f)", s.at, mib(s.heap), mib(base.heap), mib(maxHeapGrowth))
		case s.rss > base.rss+rssBound(base):
			t.Errorf("at %v: RSS %.1f MiB, %.1f at the baseline (bound +%.1f)", s.at, mib(s.rss), mib(base.rss), mib(rssBound(base)))
		}
	}
}
