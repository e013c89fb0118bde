package main

// Clustering: the store.etcd configuration, the replica's metadata cache,
// membership and leader election (see package cluster and docs/OPERATIONS.md).

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/cluster"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/etcd"
)

// StoreConfig is the store: section. Without etcd the store is the
// embedded bbolt file <data_dir>/hsmd.db (one node).
type StoreConfig struct {
	Etcd *EtcdConfig `yaml:"etcd"`
}

// EtcdConfig puts the metadata in an etcd cluster shared by replicas.
type EtcdConfig struct {
	Endpoints []string `yaml:"endpoints"` // client URLs, e.g. https://etcd-0:2379
	Prefix    string   `yaml:"prefix"`    // key prefix, default /hsmd/
	TLS       struct {
		CAFile   string `yaml:"ca_file"`
		CertFile string `yaml:"cert_file"`
		KeyFile  string `yaml:"key_file"`
	} `yaml:"tls"`
	// Replica names this replica in the cluster (and, by default, its
	// audit log: origin hsmd/<replica>). Default: the host name.
	Replica string `yaml:"replica"`
	// Advertise is the address clients use for this replica, shown by
	// hsmd cluster status.
	Advertise string `yaml:"advertise"`
	// MaxStaleness: how long the replica keeps serving known keys from its
	// cache when it cannot confirm it is current (etcd without quorum);
	// it fails closed after. Default 30s.
	MaxStaleness time.Duration `yaml:"max_staleness"`
	// ConfirmTimeout bounds how long a key change waits for every replica
	// to apply it before its call returns DEADLINE_EXCEEDED naming the
	// replicas that have not (the change is committed). Default 2s.
	ConfirmTimeout time.Duration `yaml:"confirm_timeout"`
	// LeaseTTL is the membership and leadership lease, in seconds: a dead
	// replica leaves, and another takes over the scheduler, within it.
	// Default 5.
	LeaseTTL int `yaml:"lease_ttl"`
}

const defaultConfirmTimeout = 2 * time.Second

func (e *EtcdConfig) applyDefaults() {
	if e.Prefix == "" {
		e.Prefix = etcd.DefaultPrefix
	}
	if e.Replica == "" {
		host, _ := os.Hostname()
		e.Replica = host
	}
	if e.MaxStaleness == 0 {
		e.MaxStaleness = etcd.DefaultMaxStaleness
	}
	if e.ConfirmTimeout == 0 {
		e.ConfirmTimeout = defaultConfirmTimeout
	}
	if e.LeaseTTL == 0 {
		e.LeaseTTL = cluster.DefaultTTL
	}
}

func (e *EtcdConfig) validate() error {
	if len(e.Endpoints) == 0 {
		return errors.New("store.etcd.endpoints is required")
	}
	if err := cluster.ValidateName(e.Replica); err != nil {
		return fmt.Errorf("store.etcd.replica: %w", err)
	}
	if e.MaxStaleness < 0 || e.ConfirmTimeout < 0 || e.LeaseTTL < 0 {
		return errors.New("store.etcd.max_staleness, confirm_timeout and lease_ttl must not be negative")
	}
	if (e.TLS.CertFile == "") != (e.TLS.KeyFile == "") {
		return errors.New("store.etcd.tls.cert_file and key_file go together")
	}
	return nil
}

// tlsConfig is the etcd client's TLS, nil for plaintext endpoints.
func (e *EtcdConfig) tlsConfig() (*tls.Config, error) {
	if e.TLS.CAFile == "" && e.TLS.CertFile == "" {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if e.TLS.CAFile != "" {
		pool, err := client.LoadRootCAs(e.TLS.CAFile)
		if err != nil {
			return nil, fmt.Errorf("store.etcd.tls.ca_file: %w", err)
		}
		c.RootCAs = pool
	}
	if e.TLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(e.TLS.CertFile, e.TLS.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("store.etcd.tls: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// replica is this hsmd's part of a cluster.
type replica struct {
	cfg   *EtcdConfig
	st    *etcd.Store
	node  *cluster.Node
	cache *etcd.Cache
	// forget, set once the engine exists, drops the cached data keys of
	// versions another replica changed (the cache may call it before).
	forget atomic.Pointer[func(old, new *store.Tenant)]
	leader prometheus.Gauge
}

// openReplica connects to etcd, joins the cluster and loads the metadata
// cache. The caller closes it.
func openReplica(ctx context.Context, e *EtcdConfig, addr string, log *slog.Logger) (_ *replica, err error) {
	tc, err := e.tlsConfig()
	if err != nil {
		return nil, err
	}
	r := &replica{cfg: e}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if r.st, err = etcd.Open(ctx, etcd.Options{Endpoints: e.Endpoints, TLS: tc, Prefix: e.Prefix}); err != nil {
		return nil, withHint(err, "check store.etcd.endpoints and that a quorum of etcd members runs")
	}
	if e.Advertise != "" {
		addr = e.Advertise
	}
	// The membership lease outlives the time this replica may serve
	// without etcd, so a replica dropped from the members (and so no longer
	// waited for by key changes) has stopped serving stale keys.
	memberTTL := int((e.MaxStaleness+time.Second-1)/time.Second) + 2
	if r.node, err = cluster.Join(ctx, cluster.Config{Client: r.st.Client(), Prefix: e.Prefix, Name: e.Replica, Addr: addr,
		TTL: memberTTL, LeaderTTL: e.LeaseTTL, Logger: log}); err != nil {
		return nil, withHint(err, "give each replica its own store.etcd.replica name")
	}
	r.cache, err = etcd.NewCache(ctx, r.st, etcd.CacheConfig{
		MaxStaleness: e.MaxStaleness, Applied: r.node.Applied, Logger: log,
		Changed: func(old, new *store.Tenant) {
			if f := r.forget.Load(); f != nil {
				(*f)(old, new)
			}
		},
	})
	if err != nil {
		return nil, err
	}
	log.Info("joined the cluster", slog.String("replica", e.Replica), slog.String("etcd", strings.Join(e.Endpoints, ",")),
		slog.Int64("revision", r.cache.Applied()))
	return r, nil
}

// confirmedStore is the replica's cache, whose CreateTenant returns once
// every replica has the new tenant (the other key changes are confirmed
// through the rotation manager's OnChange).
type confirmedStore struct {
	*etcd.Cache
	r *replica
}

func (s confirmedStore) CreateTenant(ctx context.Context, t *store.Tenant) error {
	if err := s.Cache.CreateTenant(ctx, t); err != nil {
		return err
	}
	return s.r.confirm(ctx)
}

// confirm waits until every replica has applied this replica's latest
// write (bounded by confirm_timeout).
func (r *replica) confirm(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.ConfirmTimeout)
	defer cancel()
	err := r.node.WaitApplied(ctx, r.cache.LastWrite())
	var ue *cluster.UnconfirmedError
	if errors.As(err, &ue) {
		// DEADLINE_EXCEEDED: "the operation may have completed" (it did).
		return status.Errorf(codes.DeadlineExceeded, "the change is committed, but replicas %s have not confirmed it within %s (each stops serving stale keys within store.etcd.max_staleness, %s, at most)",
			strings.Join(ue.Members, ", "), r.cfg.ConfirmTimeout, r.cfg.MaxStaleness)
	}
	if err != nil {
		return status.Errorf(codes.DeadlineExceeded, "the change is committed, but whether every replica applied it could not be read (each stops serving stale keys within store.etcd.max_staleness, %s, at most)", r.cfg.MaxStaleness)
	}
	return nil
}

func (r *replica) close() {
	if r.cache != nil {
		r.cache.Close()
	}
	if r.node != nil {
		r.node.Close()
	}
	if r.st != nil {
		r.st.Close()
	}
}

// forgetChanged drops the cached data keys of every version of old that
// new no longer has in the same state (another replica disabled,
// destroyed or shredded it): the resolver already refuses them, and their
// keys should not stay in memory.
func forgetChanged(eng *envelope.Engine, old, new *store.Tenant) {
	if old == nil || eng == nil {
		return
	}
	for _, v := range old.Versions {
		if new != nil {
			if nv, ok := new.Version(v.Version); ok && nv.State == v.State {
				continue
			}
		}
		eng.Forget(old.ID, v.Version)
	}
}

// lead runs job (the rotation scheduler) while this replica leads.
func (r *replica) lead(ctx context.Context, job func(context.Context)) {
	r.node.Lead(ctx, job, func(leader bool) {
		if leader {
			r.leader.Set(1)
		} else {
			r.leader.Set(0)
		}
	})
}

// publishCheckpoints records the audit log's newest checkpoint in etcd
// (under <prefix>audit/<replica>) whenever it changes, so that hsmd cluster
// verify-audit can check every replica's log against what it published.
func (r *replica) publishCheckpoints(ctx context.Context, c *Config) {
	every := c.Audit.CheckpointInterval
	if every <= 0 {
		every = 5 * time.Second
	}
	file := filepath.Join(c.DataDir, "audit", "log", "checkpoint")
	var last []byte
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if cp, err := os.ReadFile(file); err == nil && !bytes.Equal(cp, last) {
			if err := cluster.PublishCheckpoint(ctx, r.st.Client(), r.cfg.Prefix, r.cfg.Replica, cp); err == nil {
				last = cp
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// registerMetrics adds the replica's gauges to reg.
func (r *replica) registerMetrics(reg prometheus.Registerer) {
	r.leader = prometheus.NewGauge(prometheus.GaugeOpts{Name: "hsmd_cluster_leader", Help: "1 while this replica leads (runs the rotation scheduler), else 0."})
	reg.MustRegister(r.leader,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hsmd_cluster_applied_revision", Help: "The etcd revision this replica's metadata cache has applied."},
			func() float64 { return float64(r.cache.Applied()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "hsmd_cluster_staleness_seconds", Help: "Time since the metadata cache last confirmed it was current (reads fail over store.etcd.max_staleness)."},
			func() float64 { return r.cache.Staleness().Seconds() }))
}
