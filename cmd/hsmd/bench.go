package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hsmd/hsmd/bench"
	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/internal/progress"
)

func init() {
	register("bench", command{summary: "measure throughput and latency against hsmd (see docs/BENCHMARKS.md)", run: runBench})
}

const benchUsage = `hsmd bench [--in-process | --addr ADDR [--metrics URL]] [--ops encrypt,decrypt]
       [--sizes 64,1KiB,...] [--batch 1,1000] [--concurrency 1,4] [--autobatch]
       [--warmup 1s] [--duration 3s] [--reps 3] [--json FILE] [--svg FILE]`

func runBench(ctx context.Context, env *cliEnv, args []string) error {
	fs, cf := newClientFlagSet(env, "bench", benchUsage)
	var (
		inProcess, autoBatch                 bool
		tenant, ops, sizes, batches, concs   string
		jsonOut, svgOut, metricsURL, showBar string
		cpuProfile, fromJSON                 string
		warmup, duration                     time.Duration
		reps                                 int
	)
	fs.BoolVar(&inProcess, "in-process", false, "start a dev hsmd (SoftHSM token, TPM simulator) in this process on a temporary data directory, and measure it over its unix socket")
	fs.StringVar(&tenant, "tenant", "bench", "tenant to use (made if missing)")
	fs.StringVar(&ops, "ops", "encrypt,decrypt", "operations: encrypt, decrypt")
	fs.StringVar(&sizes, "sizes", "64,1KiB,16KiB,64KiB,1MiB", "item sizes (B, KiB, MiB)")
	fs.StringVar(&batches, "batch", "1,1000", "items per call")
	fs.StringVar(&concs, "concurrency", "1,4", "goroutines calling at once")
	fs.BoolVar(&autoBatch, "autobatch", false, "send batch size 1 as single-item calls through the client's auto-batching")
	fs.DurationVar(&warmup, "warmup", time.Second, "unmeasured run before each point")
	fs.DurationVar(&duration, "duration", 3*time.Second, "length of each measured repetition")
	fs.IntVar(&reps, "reps", 3, "measured repetitions per point (the median is reported)")
	fs.StringVar(&jsonOut, "json", "", "write the results as JSON to this file")
	fs.StringVar(&svgOut, "svg", "", "write a chart of throughput against item size, with raw AES-256-GCM, to this SVG file")
	fs.StringVar(&metricsURL, "metrics", "", "the server's Prometheus metrics URL, for HSM calls and server CPU (default: the dev profile's, for the default --addr)")
	fs.StringVar(&showBar, "progress", "auto", "progress on stderr: auto (a bar on a terminal), on, off")
	fs.StringVar(&fromJSON, "from-json", "", "measure nothing: print the table of, and draw --svg from, the results in this JSON file (from --json)")
	fs.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of this process (with --in-process, the server's too) to this file")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return &usageError{msg: "bench takes no arguments; usage: " + benchUsage}
	}
	if fromJSON != "" {
		b, err := os.ReadFile(fromJSON)
		if err != nil {
			return err
		}
		var res bench.Result
		if err := json.Unmarshal(b, &res); err != nil {
			return fmt.Errorf("%s: %w", fromJSON, err)
		}
		return writeBenchResults(env.stdout, &res, jsonOut, svgOut)
	}
	cfg := &bench.Config{Tenant: tenant, AutoBatch: autoBatch, Warmup: warmup, Duration: duration, Reps: reps}
	if cfg.Ops, err = splitList(ops, func(s string) (string, error) { return s, nil }); err != nil {
		return err
	}
	if cfg.Sizes, err = splitList(sizes, bench.ParseSize); err != nil {
		return err
	}
	if cfg.Batches, err = splitList(batches, strconv.Atoi); err != nil {
		return err
	}
	if cfg.Concurrency, err = splitList(concs, strconv.Atoi); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()

	target := cf.addr
	if inProcess {
		addr, murl, closeDaemon, err := startBenchDaemon(ctx, env)
		if err != nil {
			return err
		}
		defer closeDaemon()
		cf.addr, metricsURL, target = addr, murl, "in-process dev hsmd"
		cfg.Server.SameProcess = true
	} else if metricsURL == "" && cf.addr == defaultClientAddr {
		metricsURL = "http://" + DefaultMetricsAddr + "/metrics"
	}
	if metricsURL != "" {
		cfg.Server.HSMCalls = func(ctx context.Context) (float64, error) {
			return scrapeMetric(ctx, metricsURL, "hsmd_hsm_calls_total")
		}
		cfg.Server.CPU = func(ctx context.Context) (time.Duration, error) {
			s, err := scrapeMetric(ctx, metricsURL, "process_cpu_seconds_total")
			return time.Duration(s * float64(time.Second)), err
		}
	}
	opts, err := cf.tls.options(cf.addr)
	if err != nil {
		return err
	}
	opts = append(opts, client.WithMaxRecvMsgSize(cliMsgSize), client.WithMaxSendMsgSize(cliMsgSize))
	if cfg.Batch, err = client.Dial(ctx, cf.addr, append(opts, client.WithAutoBatch(client.AutoBatchOptions{Disabled: true}))...); err != nil {
		return &usageError{msg: "--addr: " + err.Error()}
	}
	defer cfg.Batch.Close()
	if cfg.Single, err = client.Dial(ctx, cf.addr, opts...); err != nil {
		return &usageError{msg: "--addr: " + err.Error()}
	}
	defer cfg.Single.Close()
	if err := ensureBenchTenant(ctx, cfg.Batch, tenant); err != nil {
		return clientRPCError("bench", err)
	}

	var meter *progress.Meter
	if bar := showBar == "on" || (showBar == "auto" && progress.IsTerminal(env.stderr)); bar {
		meter = progress.New(env.stderr, "hsmd bench", 1000, 0)
		meter.Start()
		cfg.Progress = func(_ string, items int64, done float64) { meter.Set(items, int64(done*1000)) }
	} else if showBar != "off" && showBar != "auto" {
		return &usageError{msg: "--progress: want auto, on or off"}
	}
	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	res := &bench.Result{Time: time.Now().UTC(), Machine: bench.ThisMachine(), Target: target,
		Warmup: warmup.String(), Duration: duration.String(), Reps: reps}
	res.Points, err = bench.Run(ctx, cfg)
	if meter != nil {
		meter.Finish()
	}
	if werr := writeBenchResults(env.stdout, res, jsonOut, svgOut); werr != nil {
		return werr
	}
	if errors.Is(err, context.Canceled) {
		fmt.Fprintln(env.stderr, "hsmd bench: interrupted; the points above were measured")
		return nil
	}
	return err
}

func writeBenchResults(stdout io.Writer, res *bench.Result, jsonOut, svgOut string) error {
	fmt.Fprintf(stdout, "hsmd bench: %s; %s, %d CPUs, %s; warm-up %s, %d × %s per point, medians\n",
		res.Target, res.Machine.CPU, res.Machine.GOMAXPROCS, res.Machine.GoVersion, res.Warmup, res.Reps, res.Duration)
	if err := res.WriteTable(stdout); err != nil {
		return err
	}
	for _, out := range []struct {
		path  string
		write func(io.Writer) error
	}{{jsonOut, res.WriteJSON}, {svgOut, res.WriteSVG}} {
		if out.path == "" {
			continue
		}
		f, err := os.Create(out.path)
		if err != nil {
			return err
		}
		if err := out.write(f); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	return nil
}

func splitList[T any](s string, parse func(string) (T, error)) ([]T, error) {
	var out []T
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		v, err := parse(f)
		if err != nil {
			return nil, &usageError{msg: fmt.Sprintf("%q: %v", f, err)}
		}
		out = append(out, v)
	}
	if len(out) == 0 {
		return nil, &usageError{msg: fmt.Sprintf("empty list %q", s)}
	}
	return out, nil
}

// ensureBenchTenant makes the tenant unless it exists, waiting up to 30 s
// for a server that is still starting.
func ensureBenchTenant(ctx context.Context, c *client.Client, name string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.CreateTenant(ctx, name)
		switch status.Code(err) {
		case codes.OK, codes.AlreadyExists:
			return nil
		case codes.Unavailable:
			if time.Now().Before(deadline) {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(100 * time.Millisecond):
				}
				continue
			}
		}
		return err
	}
}

// scrapeMetric reads the sum of a metric's samples from a Prometheus text
// exposition.
func scrapeMetric(ctx context.Context, url, name string) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return 0, err
	}
	f, ok := fams[name]
	if !ok {
		return 0, fmt.Errorf("%s: no metric %s", url, name)
	}
	var sum float64
	for _, m := range f.GetMetric() {
		switch {
		case m.GetCounter() != nil:
			sum += m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			sum += m.GetGauge().GetValue()
		case m.GetUntyped() != nil:
			sum += m.GetUntyped().GetValue()
		}
	}
	return sum, nil
}

// startBenchDaemon starts a dev hsmd in this process on a temporary data
// directory, with loopback TCP and metrics on free ports, and returns its
// unix socket address, its metrics URL and what stops it and removes the
// directory.
func startBenchDaemon(ctx context.Context, env *cliEnv) (addr, metricsURL string, closeFn func(), err error) {
	dir, err := os.MkdirTemp("", "hsmd-bench-")
	if err != nil {
		return "", "", nil, err
	}
	fail := func(err error) (string, string, func(), error) {
		os.RemoveAll(dir)
		return "", "", nil, err
	}
	tcp, err := freeLoopbackAddr()
	if err != nil {
		return fail(err)
	}
	metrics, err := freeLoopbackAddr()
	if err != nil {
		return fail(err)
	}
	log := slog.New(slog.NewTextHandler(env.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	p := &profileFlags{dev: true, dataDir: dir}
	c, dev, err := p.load(func(string, ...any) {})
	if err != nil {
		return fail(err)
	}
	c.Listen.Unix, c.Listen.TCP, c.Listen.Metrics = filepath.Join(dir, "hsmd.sock"), tcp, metrics
	c.Log.Level = "warn"
	d, err := openDaemon(ctx, c, p, dev, log)
	if err != nil {
		return fail(err)
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() {
		done <- d.serve(sctx, &cliEnv{stdout: io.Discard, stderr: env.stderr, getenv: func(string) string { return "" }})
	}()
	closeFn = func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			fmt.Fprintf(env.stderr, "hsmd bench: the in-process hsmd: %v\n", err)
		}
		d.close()
		os.RemoveAll(dir)
	}
	return "unix://" + c.Listen.Unix, "http://" + metrics + "/metrics", closeFn, nil
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
