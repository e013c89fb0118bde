// Package bench is hsmd's load generator (`hsmd bench`): it drives a
// running hsmd through the Go client with batches or auto-batched
// single-item calls, over a sweep of operations, item sizes, batch sizes
// and concurrency, each point warmed up and then measured several times;
// it reports throughput, latency quantiles, HSM calls per 1,000 items and
// CPU time per item, beside raw AES-256-GCM measured on the same machine
// in the same run, as a table, JSON and an SVG chart.
package bench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hsmd/hsmd/client"
)

// Ops a point can measure.
const (
	OpEncrypt = "encrypt"
	OpDecrypt = "decrypt"
)

// MaxPointBytes bounds the plaintext of one call (batch × item size): the
// server's default request limit is 64 MiB, and the response is larger.
const MaxPointBytes = 48 << 20

// Server reports the counters of the server under test. Either function
// may be nil (not known).
type Server struct {
	// HSMCalls returns the server's HSM calls so far
	// (hsmd_hsm_calls_total).
	HSMCalls func(context.Context) (float64, error)
	// CPU returns the server process's CPU time so far
	// (process_cpu_seconds_total).
	CPU func(context.Context) (time.Duration, error)
	// SameProcess: the server runs in this process, so its CPU is in the
	// client's (reported as the total, not twice).
	SameProcess bool
}

// Config is a sweep.
type Config struct {
	// Batch sends batch calls; Single sends single-item calls (it should
	// auto-batch: client.WithAutoBatch). Both talk to the same server.
	Batch, Single *client.Client
	Tenant        string
	Server        Server

	Ops         []string
	Sizes       []int // item sizes in bytes
	Batches     []int // items per call; 1 with AutoBatch means single-item calls
	Concurrency []int // goroutines calling at once
	// AutoBatch sends batch size 1 as single-item calls through Single.
	AutoBatch bool

	Warmup, Duration time.Duration
	Reps             int
	// Progress, if set, is called about ten times a second with the
	// current point, the items done so far in the sweep (warm-ups
	// included) and the fraction of the sweep's planned time elapsed.
	Progress func(point string, items int64, done float64)

	items atomic.Int64 // done in the sweep
}

// Point is one measured combination.
type Point struct {
	Op          string `json:"op"`
	Size        int    `json:"item_bytes"`
	Batch       int    `json:"batch"`
	Concurrency int    `json:"concurrency"`
	AutoBatch   bool   `json:"auto_batch"`
	// Skipped says why the point was not run (it would exceed a limit).
	Skipped string `json:"skipped,omitempty"`
	Reps    []Rep  `json:"reps,omitempty"`
	// Median over the repetitions (by items/s).
	ItemsPerSec float64 `json:"items_per_sec"`
	MBPerSec    float64 `json:"mb_per_sec"`
	// RawMBPerSec is raw AES-256-GCM (Seal or Open) on this machine at
	// the same item size; Ratio is MBPerSec / RawMBPerSec.
	RawMBPerSec float64 `json:"raw_aes_gcm_mb_per_sec"`
	Ratio       float64 `json:"ratio_to_raw"`
}

// Rep is one measured phase.
type Rep struct {
	Items   int64         `json:"items"`
	Errors  int64         `json:"errors"`
	Elapsed time.Duration `json:"elapsed_ns"`
	P50     time.Duration `json:"p50_ns"`
	P99     time.Duration `json:"p99_ns"`
	P999    time.Duration `json:"p999_ns"`
	// HSMCallsPer1k is HSM calls per 1,000 items, -1 if unknown.
	HSMCallsPer1k float64 `json:"hsm_calls_per_1k_items"`
	// ClientCPUPerItem is this process's CPU time per item; with the
	// server in process, the two together.
	ClientCPUPerItem time.Duration `json:"client_cpu_per_item_ns"`
	// ServerCPUPerItem is the server's, -1 if unknown or in process.
	ServerCPUPerItem time.Duration `json:"server_cpu_per_item_ns"`
}

// Name is the point's label: op/size/batch/concurrency.
func (p *Point) Name() string {
	b := fmt.Sprintf("batch=%d", p.Batch)
	if p.AutoBatch && p.Batch == 1 {
		b = "single(auto-batched)"
	}
	return fmt.Sprintf("%s/%s/%s/conc=%d", p.Op, SizeString(p.Size), b, p.Concurrency)
}

// Median returns the repetition with the median items/s.
func (p *Point) Median() Rep {
	if len(p.Reps) == 0 {
		return Rep{}
	}
	rs := slices.Clone(p.Reps)
	slices.SortFunc(rs, func(a, b Rep) int { return cmpFloat(a.rate(), b.rate()) })
	return rs[len(rs)/2]
}

func (r Rep) rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Items) / r.Elapsed.Seconds()
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Run measures every point of the sweep in order; ctx's end stops it and
// returns the points measured so far with ctx's error.
func Run(ctx context.Context, cfg *Config) ([]Point, error) {
	if cfg.Reps < 1 || cfg.Duration <= 0 || cfg.Warmup < 0 {
		return nil, errors.New("bench: reps must be at least 1 and duration positive")
	}
	var points []Point
	for _, op := range cfg.Ops {
		if op != OpEncrypt && op != OpDecrypt {
			return nil, fmt.Errorf("bench: unknown op %q (encrypt or decrypt)", op)
		}
		for _, size := range cfg.Sizes {
			for _, batch := range cfg.Batches {
				for _, conc := range cfg.Concurrency {
					if size < 0 || batch < 1 || conc < 1 {
						return nil, fmt.Errorf("bench: size %d, batch %d, concurrency %d: sizes must be ≥ 0, batch and concurrency ≥ 1", size, batch, conc)
					}
					p := Point{Op: op, Size: size, Batch: batch, Concurrency: conc, AutoBatch: cfg.AutoBatch && batch == 1}
					if batch*size > MaxPointBytes {
						p.Skipped = fmt.Sprintf("%d × %s exceeds %d MiB per call", batch, SizeString(size), MaxPointBytes>>20)
					}
					points = append(points, p)
				}
			}
		}
	}
	raw := map[string]float64{}
	planned := time.Duration(0)
	for _, p := range points {
		if p.Skipped == "" {
			planned += cfg.Warmup + time.Duration(cfg.Reps)*cfg.Duration
		}
	}
	start := time.Now()
	for i := range points {
		p := &points[i]
		if p.Skipped != "" {
			continue
		}
		if err := cfg.runPoint(ctx, p, start, planned); err != nil {
			return points[:i], err
		}
		key := fmt.Sprint(p.Op, p.Size)
		if _, ok := raw[key]; !ok {
			raw[key] = RawAESGCM(p.Op, p.Size, min(p.Concurrency, runtime.GOMAXPROCS(0)), 300*time.Millisecond)
		}
		p.RawMBPerSec = raw[key]
		m := p.Median()
		p.ItemsPerSec = m.rate()
		p.MBPerSec = p.ItemsPerSec * float64(p.Size) / 1e6
		if p.RawMBPerSec > 0 {
			p.Ratio = p.MBPerSec / p.RawMBPerSec
		}
	}
	return points, nil
}

// worker is one goroutine's load: a request's items, made once.
type worker struct {
	items []client.Item
	cts   []client.CiphertextItem
	hist  Histogram
}

func (cfg *Config) newWorker(ctx context.Context, p *Point) (*worker, error) {
	w := &worker{items: make([]client.Item, p.Batch)}
	buf := make([]byte, p.Batch*p.Size)
	rand.Read(buf)
	for i := range w.items {
		w.items[i].Plaintext = buf[i*p.Size : (i+1)*p.Size : (i+1)*p.Size]
	}
	if p.Op == OpDecrypt {
		cts, _, err := cfg.Batch.Encrypt(ctx, cfg.Tenant, w.items)
		if err != nil {
			return nil, fmt.Errorf("bench: make ciphertexts to decrypt: %w", err)
		}
		w.cts = make([]client.CiphertextItem, len(cts))
		for i, ct := range cts {
			w.cts[i].Ciphertext = ct
		}
	}
	return w, nil
}

// call sends one request (or, auto-batched, one single-item call).
func (cfg *Config) call(ctx context.Context, p *Point, w *worker) error {
	switch {
	case p.AutoBatch && p.Op == OpEncrypt:
		_, err := cfg.Single.EncryptOne(ctx, cfg.Tenant, w.items[0])
		return err
	case p.AutoBatch:
		_, err := cfg.Single.DecryptOne(ctx, cfg.Tenant, w.cts[0])
		return err
	case p.Op == OpEncrypt:
		_, _, err := cfg.Batch.Encrypt(ctx, cfg.Tenant, w.items)
		return err
	}
	rs, err := cfg.Batch.Decrypt(ctx, cfg.Tenant, w.cts)
	if err == nil {
		for _, r := range rs {
			if r.Err != nil {
				return r.Err
			}
		}
	}
	return err
}

func (cfg *Config) runPoint(ctx context.Context, p *Point, sweepStart time.Time, planned time.Duration) error {
	workers := make([]*worker, p.Concurrency)
	for i := range workers {
		var err error
		if workers[i], err = cfg.newWorker(ctx, p); err != nil {
			return err
		}
	}
	progress := func() {
		if cfg.Progress != nil && planned > 0 {
			cfg.Progress(p.Name(), cfg.items.Load(), min(1, float64(time.Since(sweepStart))/float64(planned)))
		}
	}
	phase := func(d time.Duration, measure bool) (Rep, error) {
		for _, w := range workers {
			w.hist = Histogram{}
		}
		var rep Rep
		hsm0, hsmErr := cfg.hsmCalls(ctx)
		srv0, srvErr := cfg.serverCPU(ctx)
		cpu0 := processCPU()
		var errs atomic.Int64
		var firstErr atomic.Value
		pctx, cancel := context.WithTimeout(ctx, d)
		defer cancel()
		start := time.Now()
		var wg sync.WaitGroup
		for _, w := range workers {
			wg.Go(func() {
				for pctx.Err() == nil {
					t0 := time.Now()
					err := cfg.call(ctx, p, w)
					if err != nil {
						errs.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					w.hist.Record(time.Since(t0))
					cfg.items.Add(int64(p.Batch))
				}
			})
		}
		tick := time.NewTicker(100 * time.Millisecond)
		for done := false; !done; {
			select {
			case <-pctx.Done():
				done = true
			case <-tick.C:
				progress()
			}
		}
		tick.Stop()
		wg.Wait()
		rep.Elapsed = time.Since(start)
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		if !measure {
			return rep, nil
		}
		var h Histogram
		for _, w := range workers {
			h.Merge(&w.hist)
		}
		rep.Items, rep.Errors = int64(h.Count())*int64(p.Batch), errs.Load()
		if calls := rep.Items/int64(p.Batch) + rep.Errors; calls > 0 && rep.Errors*100 > calls {
			return rep, fmt.Errorf("bench: %s: %d of %d calls failed (first: %v)", p.Name(), rep.Errors, calls, firstErr.Load())
		}
		rep.P50, rep.P99, rep.P999 = h.Quantile(.5), h.Quantile(.99), h.Quantile(.999)
		rep.HSMCallsPer1k, rep.ServerCPUPerItem = -1, -1
		if rep.Items == 0 {
			return rep, fmt.Errorf("bench: %s: no call completed in %v", p.Name(), d)
		}
		if hsm1, err := cfg.hsmCalls(ctx); err == nil && hsmErr == nil {
			rep.HSMCallsPer1k = (hsm1 - hsm0) * 1000 / float64(rep.Items)
		}
		rep.ClientCPUPerItem = (processCPU() - cpu0) / time.Duration(rep.Items)
		if srv1, err := cfg.serverCPU(ctx); err == nil && srvErr == nil && !cfg.Server.SameProcess {
			rep.ServerCPUPerItem = (srv1 - srv0) / time.Duration(rep.Items)
		}
		return rep, nil
	}
	if cfg.Warmup > 0 {
		if _, err := phase(cfg.Warmup, false); err != nil {
			return err
		}
	}
	for range cfg.Reps {
		rep, err := phase(cfg.Duration, true)
		if err != nil {
			return err
		}
		p.Reps = append(p.Reps, rep)
	}
	progress()
	return nil
}

var errUnknown = errors.New("bench: not known")

func (cfg *Config) hsmCalls(ctx context.Context) (float64, error) {
	if cfg.Server.HSMCalls == nil {
		return 0, errUnknown
	}
	return cfg.Server.HSMCalls(ctx)
}

func (cfg *Config) serverCPU(ctx context.Context) (time.Duration, error) {
	if cfg.Server.CPU == nil {
		return 0, errUnknown
	}
	return cfg.Server.CPU(ctx)
}

// processCPU is this process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
