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
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/quorum"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/signing"
	"github.com/hsmd/hsmd/store"
)

func init() {
	register("serve", command{summary: "run the daemon", run: runServe})
	register("init", command{summary: "create the root keys on an HSM token that has none", run: runInit})
}

// profileFlags are the flags serve and init share.
type profileFlags struct {
	config   string
	dev      bool
	dataDir  string
	insecure bool // --insecure-no-tpm
	// newAuditLog is --new-audit-log.
	newAuditLog bool
}

func (p *profileFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&p.config, "config", "", "configuration file (YAML)")
	fs.BoolVar(&p.dev, "dev", false, "development profile: a SoftHSM token under the data dir, made on first start, and loopback listeners")
	fs.StringVar(&p.dataDir, "data-dir", "", "data directory (default "+DefaultDataDir+")")
	fs.BoolVar(&p.insecure, "insecure-no-tpm", false, "run without a TPM: the PIN stays in its file and the data directory is not protected against edits or rollback")
	fs.BoolVar(&p.newAuditLog, "new-audit-log", false, "accept a missing audit log and begin a new one (a data directory from before the audit log); never needed otherwise")
}

// load builds the configuration from the file and the flags, and sets up
// the dev profile.
func (p *profileFlags) load(logf func(string, ...any)) (*Config, devSetup, error) {
	c, err := p.loadConfig(logf)
	if err != nil {
		return nil, devSetup{}, err
	}
	var dev devSetup
	if p.dev {
		if dev, err = devProfile(c, p.insecure, logf); err != nil {
			return nil, devSetup{}, err
		}
	}
	c.newAuditLog = p.newAuditLog
	return c, dev, c.validate(p.insecure)
}

func (p *profileFlags) loadConfig(logf func(string, ...any)) (*Config, error) {
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
	return c, nil
}

func runServe(ctx context.Context, env *cliEnv, args []string) error {
	fs := flag.NewFlagSet("hsmd serve", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var p profileFlags
	p.register(fs)
	var l ListenConfig
	fs.StringVar(&l.Unix, "listen-unix", "", "unix socket path (default <data-dir>/hsmd.sock)")
	fs.StringVar(&l.TCP, "listen-tcp", "", "TCP address: TLS with a tls: configuration (the dev profile's), else plaintext and loopback only (dev default "+DefaultTCPAddr+")")
	fs.StringVar(&l.Metrics, "listen-metrics", "", "metrics address (dev default "+DefaultMetricsAddr+")")
	var kms KMSConfig
	fs.StringVar(&kms.Socket, "kms-socket", "", "serve the Kubernetes KMS v2 plugin on this unix socket (with --kms-tenant; see docs/KUBERNETES.md)")
	fs.StringVar(&kms.Tenant, "kms-tenant", "", "the tenant whose key seals the Kubernetes API server's data keys")
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	log := newLogger(env, "info")
	c, dev, err := p.load(func(f string, a ...any) { log.Info(fmt.Sprintf(f, a...)) })
	if err != nil {
		return err
	}
	for _, o := range []struct {
		dst *string
		v   string
	}{{&c.Listen.Unix, l.Unix}, {&c.Listen.TCP, l.TCP}, {&c.Listen.Metrics, l.Metrics}, {&c.KMS.Socket, kms.Socket}, {&c.KMS.Tenant, kms.Tenant}} {
		if o.v != "" {
			*o.dst = o.v
		}
	}
	if err := c.KMS.validate(); err != nil {
		return err
	}
	log = newLogger(env, c.Log.Level)
	if fp := env.getenv("HSMD_FAILPOINT"); fp != "" && p.dev {
		armFailpoint(fp, log)
	}
	d, err := openDaemon(ctx, c, &p, dev, log)
	if err != nil {
		return err
	}
	defer d.close()
	return d.serve(ctx, env)
}

// daemon is a running hsmd: its parts, engine, services and listeners.
type daemon struct {
	*parts
	srv        *server.Server
	reg        *prometheus.Registry
	sched      *rotation.Scheduler
	witness    *signing.Witness // nil if no log is registered
	witnessCfg server.WitnessConfig
	authz      *server.Authorizer // nil without authz.policy
}

// openDaemon bootstraps the parts (see bootstrap) and the services.
func openDaemon(ctx context.Context, c *Config, p *profileFlags, dev devSetup, log *slog.Logger) (*daemon, error) {
	pt, err := bootstrap(ctx, c, p.insecure, p.dev, dev, log)
	if err != nil {
		return nil, err
	}
	d := &daemon{parts: pt, reg: prometheus.NewRegistry()}
	var eng *envelope.Engine
	if pt.replica != nil {
		forget := func(old, new *store.Tenant) { forgetChanged(eng, old, new) }
		defer pt.replica.forget.Store(&forget) // once eng is set

		pt.replica.registerMetrics(d.reg)
	}
	metrics := server.NewMetrics(d.reg, func() envelope.Stats { return eng.Stats() })
	metrics.RegisterHSMRecovery(func() server.HSMRecovery {
		r := pt.hsm.Recoveries()
		return server.HSMRecovery{Recoveries: r.Recoveries, Attempts: r.Attempts, Last: r.Last, Recovering: r.Recovering}
	})
	ec := c.envelopeConfig(metrics.InstrumentDeriver(pt.hsm))
	ec.OnSealKey = func(ref envelope.KeyRef) { d.srv.RecordDEK(ref) } // usage limits
	xwing := &server.XWingKeys{Store: pt.meta, Wrap: pt.hsm}          // suite 0x02 (offline HPKE producers)
	ec.XWing = xwing
	if eng, err = envelope.New(ec); err != nil {
		d.close()
		return nil, err
	}
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	keys := d.keyManager(eng, p.dev)
	d.sched = &rotation.Scheduler{
		Manager: keys,
		OnBatch: func(ctx context.Context, cs []rotation.Change) error { return d.changed(ctx, eng, cs...) },
		OnPass: func(st rotation.Stats, err error) {
			if err != nil || st.Rotated+st.Destroyed+st.Failed > 0 {
				log.Info("rotation pass", slog.Int("scanned", st.Scanned), slog.Int("rotated", st.Rotated),
					slog.Int("destroyed", st.Destroyed), slog.Int("failed", st.Failed), slog.Any("error", err))
			}
		},
	}
	sc := server.Config{
		Store: pt.meta, Engine: eng, Metrics: metrics, Limits: c.Limits, Logger: log, KDKVersion: pt.hsm.NewestKDK(),
		Ready: pt.hsm.Ready, InsecureNoTPM: pt.insecure, Keys: keys,
		Audit: pt.audit, AuditContexts: pt.auditCtx, XWing: xwing,
	}
	pt.auditMetrics = metrics.ObserveAuditWrite
	if c.Quorum.Policy != "" {
		if sc.Quorum, err = quorum.LoadPolicy(c.Quorum.Policy); err != nil {
			d.close()
			return nil, withHint(err, "quorum.policy names the operators and threshold that destructive calls need approvals from")
		}
		sc.QuorumSpent = quorum.NewFileSpent(filepath.Join(c.DataDir, "quorum-spent.json"))
	}
	if sc.Authz, err = d.authorizer(c); err != nil {
		d.close()
		return nil, err
	}
	d.authz = sc.Authz
	if pt.tpm != nil {
		sc.TPM = pt.tpm.Ping
		sc.RollbackCounter = pt.counter.Value
	}
	if d.srv, err = server.New(sc); err != nil {
		d.close()
		return nil, err
	}
	if d.witness, d.witnessCfg, err = pt.witness(ctx); err != nil {
		d.close()
		return nil, err
	}
	detail := "rollback_counter=none (--insecure-no-tpm)"
	if pt.counter != nil {
		detail = fmt.Sprintf("rollback_counter=%d", pt.counter.Value())
	}
	if err := pt.audit.Append(ctx, audit.Entry{Kind: audit.KindSystem, Op: "start", Detail: detail}, true); err != nil {
		d.close()
		return nil, withHint(err, "the audit log cannot record the start: check that "+filepath.Join(c.DataDir, "audit")+" is writable and has space")
	}
	pt.auditStarted = true
	return d, nil
}

// armFailpoint makes the process kill itself (SIGKILL, as a crash) when
// key management reaches the named step (rotation.Failpoint). It is a test
// seam for the crash tests, honoured with --dev only.
func armFailpoint(name string, log *slog.Logger) {
	log.Warn("failpoint armed: hsmd will crash at this step", slog.String("failpoint", name))
	rotation.Failpoint = func(at string) {
		if at == name {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
	}
}

// keyManager applies key operations; after each it drops the cached data
// keys of the versions concerned and advances the rollback counter.
func (d *daemon) keyManager(eng *envelope.Engine, dev bool) *rotation.Manager {
	m := &rotation.Manager{
		Store:      d.meta,
		KDKVersion: d.hsm.NewestKDK,
		OnChange:   func(ctx context.Context, c rotation.Change) error { return d.changed(ctx, eng, c) },
	}
	if dev {
		m.MinDestroyWait = rotation.NoMinDestroyWait // the dev profile may destroy at once; production waits at least 24 h
	}
	return m
}

// changed runs after committed key changes: their cached data keys go,
// each is recorded durably in the audit log, and the rollback counter
// advances once (binding the audit anchor to it), so that a restored older
// copy of the data directory (which would resurrect a destroyed version or
// a shredded tenant, or hide the log's entries) is refused.
func (d *daemon) changed(ctx context.Context, eng *envelope.Engine, cs ...rotation.Change) error {
	d.srv.KeyChanged(cs...)
	var auditErr error
	for _, c := range cs {
		for _, v := range c.Versions {
			eng.Forget(c.TenantID, v)
		}
		d.log.Info("key change", slog.String("op", c.Op), slog.String("tenant", c.Tenant))
		if err := server.KeyEvent(ctx, d.audit, c.Op, c.Tenant, c.Versions); err != nil && auditErr == nil {
			auditErr = err
		}
	}
	if d.counter != nil && len(cs) > 0 {
		if _, err := d.counter.Advance(ctx); err != nil {
			return errors.Join(auditErr, err)
		}
	}
	if auditErr == nil && d.replica != nil && len(cs) > 0 {
		// In force on every replica before the call returns, or said.
		return d.replica.confirm(ctx)
	}
	return auditErr
}

// serve listens and serves until ctx is done, then stops gracefully.
func (d *daemon) serve(ctx context.Context, env *cliEnv) error {
	creds, err := d.transportOptions()
	if err != nil {
		return err
	}
	g := grpc.NewServer(append(d.srv.ServerOptions(), creds...)...)
	d.srv.Register(g)
	var witnessHTTP http.Handler
	if d.witness != nil {
		ws, err := server.NewWitnessService(d.witness, d.witnessCfg)
		if err != nil {
			return err
		}
		ws.Register(g)
		wh, err := server.NewWitnessHandler(d.witness, d.log)
		if err != nil {
			return err
		}
		witnessHTTP = wh.Audited(d.audit)
	}
	ls, err := d.listen()
	if err != nil {
		return err
	}
	if d.replica != nil && d.replica.cfg.Advertise == "" {
		for _, l := range ls {
			if !l.metrics && !l.witness && !strings.HasPrefix(l.name, "unix://") {
				d.replica.node.SetAddr(l.name)
			}
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The background jobs finish before serve returns, so that the audit
	// log and the store (closed after) outlive any key change they make.
	var jobs sync.WaitGroup
	defer jobs.Wait()
	defer cancel()
	jobs.Go(func() { d.srv.WatchReady(ctx, 5*time.Second) })
	if d.replica != nil {
		jobs.Go(func() { d.replica.lead(ctx, d.sched.Run) })
		jobs.Go(func() { d.replica.publishCheckpoints(ctx, d.cfg) })
	} else {
		jobs.Go(func() { d.sched.Run(ctx) })
	}
	jobs.Go(func() { d.srv.WatchKeys(ctx, time.Minute) })
	jobs.Go(func() { watchAuthz(ctx, d.authz) })
	errc := make(chan error, len(ls)+2)
	stopKMS, err := d.serveKMS(ctx, errc)
	if err != nil {
		return err
	}
	defer stopKMS()
	var metricsSrv, witnessSrv *http.Server
	for _, l := range ls {
		if l.witness {
			if witnessHTTP == nil {
				return errors.New("listen.witness is set but witness.logs registers no log")
			}
			mux := http.NewServeMux()
			mux.Handle(server.AddCheckpointPath, witnessHTTP)
			witnessSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second}
			go func() { errc <- witnessSrv.Serve(l.l) }()
			continue
		}
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
	for _, s := range []*http.Server{metricsSrv, witnessSrv} {
		if s != nil {
			s.Close()
		}
	}
	return err
}
