// Package etcdtest starts real etcd clusters inside the test process, with
// go.etcd.io/etcd/server/v3/embed, for the tests of the etcd metadata store
// and of whatever runs on it.
//
// Members listen on loopback ports picked at random (embed cannot listen on
// port 0 for its peer URLs, so a port is found by binding and closing, and
// the whole cluster is started again if another process took one in
// between). Data lives under t.TempDir with fsync turned off: a cluster is
// fast, and its data is worthless after the test. etcd's logs are
// discarded (it logs errors even on a clean shutdown); what goes wrong
// reaches the test as an error from Start or Restart.
//
// # Concurrency
//
// A *Cluster is safe for concurrent use; Stop and Restart are serialised
// (Restart holds the cluster until its member is ready).
package etcdtest

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// ReadyTimeout bounds the wait for a started or restarted member to be
// ready to serve clients.
const ReadyTimeout = 20 * time.Second

// startAttempts is how many times Start picks new ports when one of them
// was taken before etcd could bind it.
const startAttempts = 5

// Cluster is a running etcd cluster of in-process members. Start makes one;
// the test's cleanup stops it.
type Cluster struct {
	tb      testing.TB
	token   string
	mu      sync.Mutex // guards members[i].etcd
	members []*member
}

type member struct {
	name      string
	dir       string
	clientURL url.URL
	peerURL   url.URL
	etcd      *embed.Etcd // nil while stopped
}

// Start starts a cluster of n members (n >= 1) and waits until every member
// is ready, or fails tb. The cluster is stopped, and its data removed, when
// tb's test ends.
func Start(tb testing.TB, n int) *Cluster {
	tb.Helper()
	if n < 1 {
		tb.Fatalf("etcdtest: a cluster needs at least one member, not %d", n)
	}
	var err error
	for attempt := 1; attempt <= startAttempts; attempt++ {
		c := &Cluster{tb: tb, token: fmt.Sprintf("etcdtest-%d-%d", time.Now().UnixNano(), attempt)}
		if err = c.start(n); err == nil {
			tb.Cleanup(c.stopAll)
			return c
		}
		c.stopAll()
		if !errors.Is(err, syscall.EADDRINUSE) && !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	tb.Fatalf("etcdtest: start a cluster of %d: %v", n, err)
	return nil
}

// start picks ports, starts every member, and waits for them to be ready.
func (c *Cluster) start(n int) error {
	ports, err := freePorts(2 * n)
	if err != nil {
		return err
	}
	var initial []string
	for i := range n {
		m := &member{
			name:      fmt.Sprintf("m%d", i),
			dir:       c.tb.TempDir(),
			clientURL: url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ports[2*i])},
			peerURL:   url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", ports[2*i+1])},
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"="+m.peerURL.String())
	}
	for _, m := range c.members {
		cfg := m.config(c.token, strings.Join(initial, ","), embed.ClusterStateFlagNew)
		if m.etcd, err = embed.StartEtcd(cfg); err != nil {
			return fmt.Errorf("member %s: %w", m.name, err)
		}
	}
	for _, m := range c.members {
		if err := waitReady(m); err != nil {
			return err
		}
	}
	return nil
}

// config is the embed configuration of m.
func (m *member) config(token, initialCluster, state string) *embed.Config {
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	cfg.ListenClientUrls = []url.URL{m.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{m.clientURL}
	cfg.ListenPeerUrls = []url.URL{m.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{m.peerURL}
	cfg.InitialCluster = initialCluster
	cfg.InitialClusterToken = token
	cfg.ClusterState = state
	cfg.UnsafeNoFsync = true // test data: speed over durability
	cfg.BcryptCost = 4       // bcrypt.MinCost: test passwords, fast logins
	cfg.EnableGRPCGateway = false
	// Quiet: etcd logs errors even on a clean shutdown. What goes wrong
	// reaches the test through StartEtcd, Err and ReadyNotify.
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	return cfg
}

// waitReady waits until m serves clients, fails, or ReadyTimeout passes.
func waitReady(m *member) error {
	timer := time.NewTimer(ReadyTimeout)
	defer timer.Stop()
	select {
	case <-m.etcd.Server.ReadyNotify():
		return nil
	case err := <-m.etcd.Err():
		return fmt.Errorf("member %s: %w", m.name, err)
	case <-timer.C:
		return fmt.Errorf("member %s: not ready after %s (no quorum?)", m.name, ReadyTimeout)
	}
}

// freePorts returns n distinct loopback ports that were free a moment ago.
// They are bound together, so they differ, then released for etcd to bind.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// stopAll stops every running member.
func (c *Cluster) stopAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range c.members {
		if m.etcd != nil {
			m.etcd.Close()
			m.etcd = nil
		}
	}
}

// Size returns the number of members, running or stopped.
func (c *Cluster) Size() int { return len(c.members) }

// Endpoints returns the client URLs of every member, running or stopped,
// for clientv3.Config.Endpoints.
func (c *Cluster) Endpoints() []string {
	eps := make([]string, len(c.members))
	for i, m := range c.members {
		eps[i] = m.clientURL.String()
	}
	return eps
}

// Endpoint returns the client URL of member i.
func (c *Cluster) Endpoint(i int) string { return c.members[i].clientURL.String() }

// Client returns a client of the given endpoints (every member's if none),
// closed when tb's test ends. It fails tb if the client cannot be made.
func (c *Cluster) Client(tb testing.TB, endpoints ...string) *clientv3.Client {
	tb.Helper()
	if len(endpoints) == 0 {
		endpoints = c.Endpoints()
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		tb.Fatalf("etcdtest: client of %v: %v", endpoints, err)
	}
	tb.Cleanup(func() { cli.Close() })
	return cli
}

// Stop stops member i gracefully, as a crashed or partitioned member looks
// to its clients and peers. Stopping a stopped member does nothing.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m := c.members[i]; m.etcd != nil {
		m.etcd.Close()
		m.etcd = nil
	}
}

// Restart starts the stopped member i again on its data and ports, and waits
// until it is ready. A member is ready once it has rejoined a quorum: of
// several stopped members of a cluster that lost quorum, restart them one
// at a time only while the others give a quorum, or expect the timeout.
// Restarting a running member does nothing. Restart returns an error if etcd
// fails to start (its ports were taken meanwhile, say) or is not ready within
// ReadyTimeout; the member is then stopped again.
func (c *Cluster) Restart(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[i]
	if m.etcd != nil {
		return nil
	}
	var initial []string
	for _, o := range c.members {
		initial = append(initial, o.name+"="+o.peerURL.String())
	}
	e, err := embed.StartEtcd(m.config(c.token, strings.Join(initial, ","), embed.ClusterStateFlagExisting))
	if err != nil {
		return fmt.Errorf("etcdtest: restart member %s: %w", m.name, err)
	}
	m.etcd = e
	if err := waitReady(m); err != nil {
		e.Close()
		m.etcd = nil
		return fmt.Errorf("etcdtest: restart: %w", err)
	}
	return nil
}
