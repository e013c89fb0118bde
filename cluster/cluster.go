// Package cluster lets several hsmd replicas that share an etcd store know
// each other: each replica is a member (a key under a lease, so a replica
// that dies leaves within the lease TTL) that publishes the store revision
// its metadata cache has applied; a change can wait until every member has
// applied it; and one member, elected through etcd, runs the singleton
// jobs (the rotation scheduler).
//
// # Layout
//
// Under the store's prefix:
//
//	<prefix>members/<name>   JSON MemberInfo, under the member's lease
//	<prefix>leader/<lease>   the election (concurrency.Election); value: name
//
// # Leadership
//
// A member leads from the moment its campaign wins until its lease is lost
// (its process dies, or it cannot reach a quorum of etcd for the lease
// TTL). A leader that loses its lease stops its jobs when its client notices
// (at most the TTL later), so two leaders may overlap for up to one TTL:
// the jobs must be safe to run twice (the rotation scheduler is: every store
// write compares revisions, and the loser gets store.ErrConflict).
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// DefaultTTL is the lease TTL of a member, in seconds: how long a dead
// replica stays listed, and the bound on leader failover (plus a campaign).
const DefaultTTL = 5

// maxMemberRecord bounds a member record read from etcd.
const maxMemberRecord = 4 << 10

// MemberInfo is what a member publishes about itself.
type MemberInfo struct {
	Name string `json:"name"`
	// Addr is where clients reach the replica (informational).
	Addr string `json:"addr,omitempty"`
	// Applied is the store revision the replica's metadata cache has
	// applied: every change committed at or before it is in force there.
	Applied int64 `json:"applied"`
	// Started is when the replica joined.
	Started time.Time `json:"started"`
	// Updated is when the record was last written.
	Updated time.Time `json:"updated"`
}

// Config configures Join.
type Config struct {
	// Client is the etcd client (shared with the store).
	Client *clientv3.Client
	// Prefix is the store's key prefix (ending in "/").
	Prefix string
	// Name names this replica: unique in the cluster, [A-Za-z0-9._-]{1,64}.
	Name string
	// Addr is published for operators (hsmd cluster status).
	Addr string
	// TTL is the member lease TTL in seconds; zero means DefaultTTL. A
	// member that stops renewing it still counts for WaitApplied until it
	// expires, so it must be longer than the time the replica may serve
	// from its cache without etcd (store.etcd.max_staleness): a replica
	// dropped from the members has stopped serving.
	TTL int
	// LeaderTTL is the lease TTL of a leadership term in seconds: the
	// bound on failover. Zero means DefaultTTL.
	LeaderTTL int
	// Logger receives membership and leadership changes; nil discards.
	Logger *slog.Logger
}

// Node is this replica's membership. It is safe for concurrent use.
type Node struct {
	cfg     Config
	log     *slog.Logger
	started time.Time

	mu      sync.Mutex
	addr    string
	applied int64
	kick    chan struct{} // applied changed: publish
	leader  bool

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// Join registers this replica and keeps it registered (renewing its lease,
// registering again after a lost lease) until Close. It returns once the
// first registration is written, or with its error. A replica must join
// before it loads the store into its cache, and report each revision its
// cache applies (Applied): WaitApplied relies on it.
func Join(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.Client == nil || !strings.HasSuffix(cfg.Prefix, "/") {
		return nil, errors.New("cluster: a client and a prefix ending in / are required")
	}
	if err := ValidateName(cfg.Name); err != nil {
		return nil, err
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.LeaderTTL == 0 {
		cfg.LeaderTTL = DefaultTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	n := &Node{cfg: cfg, log: cfg.Logger, started: time.Now().UTC(), addr: cfg.Addr, kick: make(chan struct{}, 1), done: make(chan struct{})}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	s, err := n.register(ctx)
	if err != nil {
		n.cancel()
		return nil, err
	}
	go n.run(s)
	return n, nil
}

// ValidateName checks a replica name: 1 to 64 of [A-Za-z0-9._-].
func ValidateName(name string) error {
	if name == "" || len(name) > 64 || strings.Trim(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != "" {
		return fmt.Errorf("cluster: replica name %q: want 1 to 64 of A-Z a-z 0-9 . _ -", name)
	}
	return nil
}

// Name is this replica's name.
func (n *Node) Name() string { return n.cfg.Name }

func (n *Node) memberKey(name string) string { return n.cfg.Prefix + "members/" + name }

// register makes a session (its lease granted within ctx, then kept alive
// until the node closes or the lease is lost) and writes the member record
// under its lease. A live record of the same name under another lease
// (another replica with this name, or this one's before a lost lease,
// until it expires) is refused.
func (n *Node) register(ctx context.Context) (*concurrency.Session, error) {
	lease, err := n.cfg.Client.Grant(ctx, int64(n.cfg.TTL))
	if err != nil {
		return nil, fmt.Errorf("cluster: lease: %w", err)
	}
	s, err := concurrency.NewSession(n.cfg.Client, concurrency.WithLease(lease.ID), concurrency.WithTTL(n.cfg.TTL), concurrency.WithContext(n.ctx))
	if err != nil {
		return nil, fmt.Errorf("cluster: lease: %w", err)
	}
	key := n.memberKey(n.cfg.Name)
	b := n.record()
	resp, err := n.cfg.Client.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(b), clientv3.WithLease(s.Lease()))).Commit()
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("cluster: register %s: %w", n.cfg.Name, err)
	}
	if !resp.Succeeded {
		s.Close()
		return nil, fmt.Errorf("cluster: a replica named %q is already a member (names must be unique; a dead one leaves within %ds)", n.cfg.Name, n.cfg.TTL)
	}
	return s, nil
}

// SetAddr changes the published address (once the listeners are bound).
func (n *Node) SetAddr(addr string) {
	n.mu.Lock()
	n.addr = addr
	n.mu.Unlock()
	n.Applied(0)
}

func (n *Node) record() []byte {
	n.mu.Lock()
	m := MemberInfo{Name: n.cfg.Name, Addr: n.addr, Applied: n.applied, Started: n.started, Updated: time.Now().UTC()}
	n.mu.Unlock()
	b, _ := json.Marshal(m)
	return b
}

// run keeps the membership: it publishes applied revisions, and when the
// session is lost registers again (with backoff) until Close.
func (n *Node) run(s *concurrency.Session) {
	defer close(n.done)
	backoff := 100 * time.Millisecond
	for {
		n.publish(s)
		s.Orphan()
		if n.ctx.Err() != nil {
			// Leaving: revoke the lease, so the record goes at once (the
			// session's own Close would use the cancelled context).
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(n.cfg.TTL)*time.Second)
			n.cfg.Client.Revoke(ctx, s.Lease())
			cancel()
			return
		}
		n.log.Warn("cluster: lost the membership lease; registering again", slog.String("replica", n.cfg.Name))
		for {
			var err error
			ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
			s, err = n.register(ctx)
			cancel()
			if err == nil {
				backoff = 100 * time.Millisecond
				n.log.Info("cluster: registered again", slog.String("replica", n.cfg.Name))
				break
			}
			if n.ctx.Err() != nil {
				return
			}
			n.log.Warn("cluster: cannot register", slog.Any("error", err))
			select {
			case <-n.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
		}
	}
}

// publish writes the member record whenever the applied revision changes,
// until the session ends or the node closes.
func (n *Node) publish(s *concurrency.Session) {
	key := n.memberKey(n.cfg.Name)
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-s.Done():
			return
		case <-n.kick:
			ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
			_, err := n.cfg.Client.Put(ctx, key, string(n.record()), clientv3.WithLease(s.Lease()))
			cancel()
			if err != nil && n.ctx.Err() == nil {
				n.log.Warn("cluster: cannot publish the applied revision", slog.Any("error", err))
				n.Applied(0) // try again with the next kick
				select {
				case <-time.After(200 * time.Millisecond):
				case <-n.ctx.Done():
				}
			}
		}
	}
}

// Applied records that the metadata cache has applied every change up to
// revision rev; it is published to the other members. Lower revisions than
// the last are ignored (rev 0 only republishes).
func (n *Node) Applied(rev int64) {
	n.mu.Lock()
	if rev > n.applied {
		n.applied = rev
	}
	n.mu.Unlock()
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// Close leaves the cluster: it stops renewing and revokes the lease (the
// member record goes at once; leadership is Lead's, ended by its context).
// Safe to call
// twice.
func (n *Node) Close() error {
	n.cancel()
	<-n.done
	return nil
}

// Members lists the live members, in name order, and the store revision
// the list was read at.
func (n *Node) Members(ctx context.Context) ([]MemberInfo, int64, error) {
	return members(ctx, n.cfg.Client, n.cfg.Prefix)
}

func members(ctx context.Context, c *clientv3.Client, prefix string) ([]MemberInfo, int64, error) {
	resp, err := c.Get(ctx, prefix+"members/", clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("cluster: members: %w", err)
	}
	var ms []MemberInfo
	for _, kv := range resp.Kvs {
		var m MemberInfo
		if len(kv.Value) > maxMemberRecord || json.Unmarshal(kv.Value, &m) != nil {
			return nil, 0, fmt.Errorf("cluster: member record %q is malformed", kv.Key)
		}
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b MemberInfo) int { return strings.Compare(a.Name, b.Name) })
	return ms, resp.Header.Revision, nil
}

// UnconfirmedError is returned by WaitApplied when members have not
// applied the revision in time.
type UnconfirmedError struct {
	Revision int64
	Members  []string // in name order
}

func (e *UnconfirmedError) Error() string {
	return fmt.Sprintf("cluster: replicas %s have not confirmed store revision %d", strings.Join(e.Members, ", "), e.Revision)
}

// WaitApplied waits until every live member has applied store revision
// rev (a member that leaves, its lease expired, no longer counts; one that
// joins after rev is not waited for: a replica joins before it loads the
// store, see Join). When ctx ends first it returns an *UnconfirmedError
// naming the members that have not.
func (n *Node) WaitApplied(ctx context.Context, rev int64) error {
	c := n.cfg.Client
	prefix := n.cfg.Prefix + "members/"
	ms, at, err := n.Members(ctx)
	if err != nil {
		return err
	}
	behind := map[string]bool{}
	for _, m := range ms {
		if m.Applied < rev {
			behind[m.Name] = true
		}
	}
	if len(behind) == 0 {
		return nil
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range c.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(at+1)) {
		if err := wr.Err(); err != nil {
			break
		}
		for _, ev := range wr.Events {
			name := strings.TrimPrefix(string(ev.Kv.Key), prefix)
			if !behind[name] {
				continue // caught up, or joined after rev (and so loaded the store after it)
			}
			var m MemberInfo
			if ev.Type == clientv3.EventTypeDelete ||
				len(ev.Kv.Value) <= maxMemberRecord && json.Unmarshal(ev.Kv.Value, &m) == nil && m.Applied >= rev {
				delete(behind, name)
			}
		}
		if len(behind) == 0 {
			return nil
		}
	}
	names := make([]string, 0, len(behind))
	for name := range behind {
		names = append(names, name)
	}
	slices.Sort(names)
	return &UnconfirmedError{Revision: rev, Members: names}
}

// Lead campaigns for leadership and runs job while this member leads,
// until ctx ends: job's context is cancelled when leadership is lost, and
// Lead campaigns again once job returns. onChange, if set, is told when
// leadership is gained or lost.
func (n *Node) Lead(ctx context.Context, job func(context.Context), onChange func(leader bool)) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		if err := n.leadOnce(ctx, job, onChange); err != nil && ctx.Err() == nil {
			n.log.Warn("cluster: campaign failed; retrying", slog.Any("error", err))
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

func (n *Node) leadOnce(ctx context.Context, job func(context.Context), onChange func(bool)) error {
	// A session of its own: losing it ends this term, not the membership.
	gctx, gcancel := context.WithTimeout(ctx, 5*time.Second)
	lease, err := n.cfg.Client.Grant(gctx, int64(n.cfg.LeaderTTL))
	gcancel()
	if err != nil {
		return err
	}
	s, err := concurrency.NewSession(n.cfg.Client, concurrency.WithLease(lease.ID), concurrency.WithTTL(n.cfg.LeaderTTL), concurrency.WithContext(ctx))
	if err != nil {
		return err
	}
	defer s.Close()
	e := concurrency.NewElection(s, n.cfg.Prefix+"leader") // keys <prefix>leader/<lease>
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-s.Done():
			cancel()
		case <-cctx.Done():
		}
	}()
	if err := e.Campaign(cctx, n.cfg.Name); err != nil {
		return err
	}
	n.setLeader(true, onChange)
	defer n.setLeader(false, onChange)
	n.log.Info("cluster: this replica leads", slog.String("replica", n.cfg.Name))
	job(cctx)
	rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer rcancel()
	e.Resign(rctx)
	return nil
}

func (n *Node) setLeader(v bool, onChange func(bool)) {
	n.mu.Lock()
	n.leader = v
	n.mu.Unlock()
	if onChange != nil {
		onChange(v)
	}
}

// IsLeader reports whether this member leads now (as far as it knows).
func (n *Node) IsLeader() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.leader
}

// Status is the cluster as one replica sees it.
type Status struct {
	Revision int64        // the store revision read
	Leader   string       // "" if none
	Members  []MemberInfo // in name order
}

// ReadStatus reads the members and the leader.
func ReadStatus(ctx context.Context, c *clientv3.Client, prefix string) (Status, error) {
	ms, rev, err := members(ctx, c, prefix)
	if err != nil {
		return Status{}, err
	}
	st := Status{Revision: rev, Members: ms}
	resp, err := c.Get(ctx, prefix+"leader/", clientv3.WithFirstCreate()...)
	if err != nil {
		return Status{}, fmt.Errorf("cluster: leader: %w", err)
	}
	if len(resp.Kvs) > 0 {
		st.Leader = string(resp.Kvs[0].Value)
	}
	return st, nil
}

// PublishCheckpoint records the newest checkpoint of replica name's audit
// log under <prefix>audit/<name>.
func PublishCheckpoint(ctx context.Context, c *clientv3.Client, prefix, name string, checkpoint []byte) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := c.Put(ctx, prefix+"audit/"+name, string(checkpoint))
	return err
}

// Checkpoints returns the checkpoints published by every replica, by name.
func Checkpoints(ctx context.Context, c *clientv3.Client, prefix string) (map[string][]byte, error) {
	resp, err := c.Get(ctx, prefix+"audit/", clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("cluster: checkpoints: %w", err)
	}
	cps := make(map[string][]byte, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		cps[strings.TrimPrefix(string(kv.Key), prefix+"audit/")] = kv.Value
	}
	return cps, nil
}
