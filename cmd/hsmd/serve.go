package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/store/bolt"
)

func init() {
	register("serve", command{summary: "run the daemon", run: runServe})
	register("init", command{summary: "create the root keys on an HSM token that has none", run: runInit})
}

// profileFlags are the flags serve and init share.
type profileFlags struct {
	config  string
	dev     bool
	dataDir string
}

func (p *profileFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&p.config, "config", "", "configuration file (YAML)")
	fs.BoolVar(&p.dev, "dev", false, "development profile: a SoftHSM token under the data dir, made on first start, and loopback listeners")
	fs.StringVar(&p.dataDir, "data-dir", "", "data directory (default "+DefaultDataDir+")")
}

// load builds the configuration from the file and the flags.
func (p *profileFlags) load(logf func(string, ...any)) (*Config, error) {
	c := &Config{}
	if p.config != "" {
		var err error
		if c, err = loadConfig(p.config); err != nil {
			return nil, err
		}
	} else if !p.dev {
		return nil, &usageError{"either --config FILE or --dev is required"}
	}
	if p.dataDir != "" {
		c.DataDir = p.dataDir
	}
	c.applyDefaults()
	if err := os.MkdirAll(c.DataDir, 0o700); err != nil {
		return nil, err
	}
	if fi, err := os.Stat(c.DataDir); err == nil && fi.Mode().Perm()&0o077 != 0 {
		logf("warning: the data directory %s is accessible to other users (mode %v); it should be 0700", c.DataDir, fi.Mode().Perm())
	}
	if p.dev {
		if err := devProfile(c, logf); err != nil {
			return nil, err
		}
	}
	return c, c.validate()
}

func runServe(ctx context.Context, env *cliEnv, args []string) error {
	fs := flag.NewFlagSet("hsmd serve", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var p profileFlags
	p.register(fs)
	var l ListenConfig
	fs.StringVar(&l.Unix, "listen-unix", "", "unix socket path (default <data-dir>/hsmd.sock)")
	fs.StringVar(&l.TCP, "listen-tcp", "", "TCP address, loopback only (dev default "+DefaultTCPAddr+")")
	fs.StringVar(&l.Metrics, "listen-metrics", "", "metrics address (dev default "+DefaultMetricsAddr+")")
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	log := newLogger(env, "info")
	c, err := p.load(func(f string, a ...any) { log.Info(fmt.Sprintf(f, a...)) })
	if err != nil {
		return err
	}
	for _, o := range []struct {
		dst *string
		v   string
	}{{&c.Listen.Unix, l.Unix}, {&c.Listen.TCP, l.TCP}, {&c.Listen.Metrics, l.Metrics}} {
		if o.v != "" {
			*o.dst = o.v
		}
	}
	log = newLogger(env, c.Log.Level)
	d, err := openDaemon(ctx, c, p.dev, log)
	if err != nil {
		return err
	}
	defer d.close()
	return d.serve(ctx, env)
}

// daemon is a running hsmd: its HSM, store, engine and listeners.
type daemon struct {
	cfg     *Config
	log     *slog.Logger
	hsm     *hsm.HSM
	store   *bolt.Store
	srv     *server.Server
	reg     *prometheus.Registry
	closers []func() error
}

// openDaemon opens the HSM (refusing to start if it cannot log in or has no
// keys, except in the dev profile, which creates them), the store, and the
// services.
func openDaemon(ctx context.Context, c *Config, dev bool, log *slog.Logger) (*daemon, error) {
	d := &daemon{cfg: c, log: log, reg: prometheus.NewRegistry()}
	h, err := hsm.Open(ctx, c.HSM)
	if err != nil {
		return nil, withHint(err, "check hsm.module, hsm.token_label and the PIN source")
	}
	d.hsm = h
	d.closers = append(d.closers, h.Close)
	if err := d.loadKeys(ctx, dev); err != nil {
		d.close()
		return nil, err
	}
	st, err := bolt.Open(filepath.Join(c.DataDir, "hsmd.db"), bolt.Options{})
	if err != nil {
		d.close()
		return nil, err
	}
	d.store = st
	d.closers = append(d.closers, st.Close)
	var eng *envelope.Engine
	metrics := server.NewMetrics(d.reg, func() envelope.Stats { return eng.Stats() })
	if eng, err = envelope.New(c.envelopeConfig(metrics.InstrumentDeriver(h))); err != nil {
		d.close()
		return nil, err
	}
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	d.srv, err = server.New(server.Config{
		Store: st, Engine: eng, Metrics: metrics, Limits: c.Limits, Logger: log, KDKVersion: 1, Ready: h.Ready,
	})
	if err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

func (d *daemon) loadKeys(ctx context.Context, dev bool) error {
	err := d.hsm.LoadKeys(ctx)
	if errors.Is(err, hsm.ErrKeyNotFound) && dev {
		d.log.Info("creating the root keys on the development token")
		if err = d.hsm.InitKeys(ctx); err == nil {
			err = d.hsm.LoadKeys(ctx)
		}
	}
	if errors.Is(err, hsm.ErrKeyNotFound) {
		return withHint(err, "create the root keys first: hsmd init --config FILE")
	}
	return err
}

func (d *daemon) close() {
	for i := len(d.closers) - 1; i >= 0; i-- {
		if err := d.closers[i](); err != nil {
			d.log.Warn("close", slog.Any("error", err))
		}
	}
	d.closers = nil
}

// serve listens and serves until ctx is done, then stops gracefully.
func (d *daemon) serve(ctx context.Context, env *cliEnv) error {
	g := grpc.NewServer(d.srv.ServerOptions()...)
	d.srv.Register(g)
	ls, err := d.listen()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go d.srv.WatchReady(ctx, 5*time.Second)
	errc := make(chan error, len(ls)+1)
	var metricsSrv *http.Server
	for _, l := range ls {
		if l.metrics {
			mux := http.NewServeMux()
			mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
			metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
			go func() { errc <- metricsSrv.Serve(l.l) }()
			continue
		}
		go func() { errc <- g.Serve(l.l) }()
	}
	d.announce(env, ls)
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	d.log.Info("stopping")
	d.srv.Health().Shutdown()
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		g.Stop()
	}
	if metricsSrv != nil {
		metricsSrv.Close()
	}
	return err
}
