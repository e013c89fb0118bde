// Package etcd is the clustered implementation of store.Store, kept in an
// etcd cluster (v3 API) that several hsmd replicas share.
//
// # Layout
//
// Every key lives under a prefix (Options.Prefix, DefaultPrefix by default):
//
//	<prefix>version           format version, decimal ASCII (FormatVersion)
//	<prefix>tenants/<name>    tenant name → record (JSON, see below)
//	<prefix>tenant-ids/<id>   tenant ID, 16 lower-case hex digits → tenant name
//
// Every tenant record is under <prefix>tenants/, so one watch of that prefix
// sees every change to them. A record is the JSON object {"tenant": T},
// where T is the encoding/json form of store.Tenant, as in package
// store/bolt: its struct tags fix the field names, times are stored in UTC
// with nanosecond precision. A record is at most MaxRecordSize bytes; a
// larger or malformed one, or one that fails store.Tenant.Validate, is
// refused with an error wrapping store.ErrInvalid when read and when written.
//
// # Revisions
//
// A tenant's revision (store.Tenant.Revision) is the etcd mod revision of its
// record: the cluster revision of the transaction that last wrote it. It is
// non-zero and grows with every write, but it counts the cluster's writes,
// not the tenant's, and the tenants of one UpdateTenants share it.
//
// # Transactions
//
// Every change is one etcd transaction, so it happens whole or not at all:
//
//	CreateTenant   if neither the record nor the ID key exists: put both
//	UpdateTenants  if every record's mod revision is the caller's revision and
//	               every ID key still names its tenant: put every record
//	DeleteTenant   (after reading the record for its ID) if the record's mod
//	               revision is the caller's revision and the ID key names the
//	               tenant: delete both
//
// A transaction whose comparisons fail reads, in the same transaction, what
// it needs to say why: store.ErrExists, store.ErrNotFound, store.ErrInvalid
// (the ID changed) or store.ErrConflict. Tenant names and IDs are therefore
// unique across the cluster, whichever replica creates them. Reads are
// linearizable; GetTenantByID reads its two keys at one revision.
//
// # Format versions
//
// New (and Open) write FormatVersion to <prefix>version if there is no
// tenant key under the prefix, and refuse a prefix whose version is newer
// (ErrVersion) or malformed, or that holds tenant keys but no version
// (ErrFormat). Keys of other packages may share the prefix. A change to the
// layout or the record encoding must bump FormatVersion and teach New to
// read the older versions.
//
// # Errors and availability
//
// Every call is bounded by its context and by the request timeout
// (Options.RequestTimeout). A call whose context ends returns an error
// wrapping ctx.Err(). A call that etcd does not answer within the request
// timeout, or refuses for want of a leader or a quorum, returns an error
// wrapping ErrUnavailable. Neither tells whether a write that was sent took
// effect: re-read. A request etcd refuses for its size (a batch over the
// cluster's request or transaction limits) returns an error wrapping
// store.ErrInvalid. Errors never include credentials.
//
// # Sealing
//
// A *Store is not a store.Sealed: sealing binds a data directory to one
// machine's TPM, and an etcd cluster is neither local nor one machine's.
// Protect the cluster with TLS client authentication and etcd's RBAC.
//
// # Concurrency
//
// A *Store is safe for concurrent use by many goroutines, and any number of
// Stores, in one process or many, may share a prefix: etcd orders their
// transactions. Close aborts the calls still running, which then return
// store.ErrClosed.
package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hsmd/hsmd/store"
)

// FormatVersion is the version of the key layout and record encoding written
// by this package.
const FormatVersion = 1

// Defaults for the zero fields of Options.
const (
	DefaultPrefix         = "/hsmd/"
	DefaultDialTimeout    = 5 * time.Second
	DefaultRequestTimeout = 5 * time.Second
)

// MaxRecordSize caps a stored tenant record, in bytes (etcd refuses requests
// over 1.5 MiB by default). Checked before a record is parsed or written.
const MaxRecordSize = 1 << 20

// MaxBatch is the largest number of tenants one UpdateTenants may write:
// etcd's default limit of 128 operations per transaction (--max-txn-ops),
// at two comparisons per tenant. A cluster with a lower limit refuses
// larger batches with an error wrapping store.ErrInvalid, as it does a
// batch over its request size limit (--max-request-bytes, 1.5 MiB by
// default).
const MaxBatch = 64

// keepAlive is the interval of the client's gRPC keepalive pings, which
// detect a member that vanished without closing its connections.
const keepAlive = 30 * time.Second

// reconnectMaxDelay caps the client's wait between attempts to reconnect to
// a member (gRPC's default grows to two minutes): once etcd is back, hsmd
// is back within this delay.
const reconnectMaxDelay = 2 * time.Second

// Errors returned by Open and New and by the methods of Store, in addition
// to the errors of package store.
var (
	// ErrUnavailable: the cluster did not answer within the request timeout,
	// or has no leader or no quorum. The error wraps etcd's, if it gave one.
	ErrUnavailable = fmt.Errorf("etcd: cluster unavailable (%w)", store.ErrUnavailable)
	// ErrVersion: the prefix was written by a newer hsmd with a format this
	// package does not know.
	ErrVersion = errors.New("etcd: unsupported format version")
	// ErrFormat: the prefix holds tenant keys but no valid format version:
	// it is not an hsmd store.
	ErrFormat = errors.New("etcd: not an hsmd store")
)

var errClosed = fmt.Errorf("etcd: %w", store.ErrClosed)

// Options configure Open. Endpoints is required; the other fields have
// defaults. Options print without the password (see String).
type Options struct {
	// Endpoints are the client URLs of the cluster's members, such as
	// "https://etcd-0.example:2379". They must not hold credentials: use
	// Username and Password, or a client certificate in TLS.
	Endpoints []string
	// TLS, if set, is the client's TLS configuration: the cluster's CA,
	// and the client certificate if etcd authenticates clients by it.
	TLS *tls.Config
	// DialTimeout bounds the connection and authentication in Open. Zero
	// means DefaultDialTimeout.
	DialTimeout time.Duration
	// RequestTimeout bounds every call whose context allows longer (or has
	// no deadline). Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Prefix is put before every key. It must end with "/". Empty means
	// DefaultPrefix.
	Prefix string
	// Username and Password authenticate to etcd's RBAC, both or neither.
	// Password must be kept secret.
	Username string
	Password string
	// Logger receives the etcd client's logs. Nil discards them: the store
	// reports failures in its errors.
	Logger *zap.Logger
}

// String describes o for logs, with the password REDACTED.
func (o Options) String() string {
	pw := ""
	if o.Password != "" {
		pw = "REDACTED"
	}
	return fmt.Sprintf("etcd.Options{Endpoints: %q, TLS: %t, Prefix: %q, Username: %q, Password: %q}",
		o.Endpoints, o.TLS != nil, o.Prefix, o.Username, pw)
}

// GoString is String, so that %#v does not print the password either.
func (o Options) GoString() string { return o.String() }

// withDefaults checks o and fills in its zero fields.
func (o Options) withDefaults() (Options, error) {
	if len(o.Endpoints) == 0 {
		return o, errors.New("etcd: no endpoints")
	}
	for _, ep := range o.Endpoints {
		if u, err := url.Parse(ep); err == nil && u.User != nil {
			return o, errors.New("etcd: an endpoint holds credentials; set Username and Password instead")
		}
	}
	if (o.Username == "") != (o.Password == "") {
		return o, errors.New("etcd: set both Username and Password, or neither")
	}
	if o.DialTimeout < 0 || o.RequestTimeout < 0 {
		return o, errors.New("etcd: negative timeout")
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if err := checkPrefix(o.Prefix); err != nil {
		return o, err
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return o, nil
}

func checkPrefix(prefix string) error {
	if !strings.HasSuffix(prefix, "/") {
		return fmt.Errorf("etcd: prefix %q does not end with /", prefix)
	}
	return nil
}

// Store is a store.Store kept in an etcd cluster. It is safe for concurrent
// use. The caller of Open or New must call Close; Close is safe to call
// twice, and every other method returns store.ErrClosed after it.
type Store struct {
	client  *clientv3.Client
	owned   bool // Close closes client (Open), or leaves it to the caller (New)
	prefix  string
	timeout time.Duration

	// done is cancelled by Close, which aborts running calls.
	done   context.Context
	cancel context.CancelFunc
	// mu guards closed: methods hold it for reading while they use client,
	// Close holds it for writing.
	mu     sync.RWMutex
	closed bool

	// lastWrite is the revision of the newest write this Store made.
	lastWrite atomic.Int64
}

// wrote records the revision of a successful write.
func (s *Store) wrote(rev int64) {
	for {
		cur := s.lastWrite.Load()
		if rev <= cur || s.lastWrite.CompareAndSwap(cur, rev) {
			return
		}
	}
}

// LastWrite returns the revision of the newest write made through this
// Store (0 before the first): once a replica has applied it, it has every
// change this one made.
func (s *Store) LastWrite() int64 { return s.lastWrite.Load() }

// Open connects to the cluster at opts.Endpoints and opens the store under
// opts.Prefix, creating it (its format version) if nothing is there.
//
// Open returns an error wrapping ctx.Err() if ctx ends first, ErrUnavailable
// if the cluster does not answer within opts.RequestTimeout, ErrVersion or
// ErrFormat (see the package doc), or another error for bad options or from
// etcd (such as a refused login). With Username set, logging in is bounded
// by opts.DialTimeout and ctx's deadline but not by ctx's cancellation. The
// caller must call Close on the returned Store, which closes the client.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	dial := opts.DialTimeout
	if deadline, ok := ctx.Deadline(); ok {
		dial = max(min(dial, time.Until(deadline)), time.Millisecond)
	}
	client, err := clientv3.New(clientv3.Config{
		Endpoints:            opts.Endpoints,
		TLS:                  opts.TLS,
		DialTimeout:          dial,
		DialKeepAliveTime:    keepAlive,
		DialKeepAliveTimeout: opts.DialTimeout,
		Username:             opts.Username,
		Password:             opts.Password,
		Logger:               opts.Logger,
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: reconnectMaxDelay},
			MinConnectTimeout: opts.DialTimeout,
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("etcd: connect to %s: %w", strings.Join(opts.Endpoints, ","), err)
	}
	s, err := newStore(ctx, client, opts.Prefix, opts.RequestTimeout)
	if err != nil {
		client.Close()
		return nil, err
	}
	s.owned = true
	return s, nil
}

// New opens the store under prefix (which must end with "/") with a client
// the caller made, and keeps, for instance to share it with watches and
// elections. Calls are bounded by DefaultRequestTimeout. Errors are those of
// Open. The caller must call Close on the returned Store, which leaves the
// client open, and must not close the client before the Store.
func New(ctx context.Context, client *clientv3.Client, prefix string) (*Store, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if client == nil {
		return nil, errors.New("etcd: nil client")
	}
	if err := checkPrefix(prefix); err != nil {
		return nil, err
	}
	return newStore(ctx, client, prefix, DefaultRequestTimeout)
}

func newStore(ctx context.Context, client *clientv3.Client, prefix string, timeout time.Duration) (*Store, error) {
	s := &Store{client: client, prefix: prefix, timeout: timeout}
	s.done, s.cancel = context.WithCancel(context.Background())
	if err := s.checkVersion(ctx); err != nil {
		s.cancel()
		return nil, err
	}
	return s, nil
}

// checkVersion writes the format version under a prefix without tenant
// keys, or checks the one there. Other keys under the prefix (package
// cluster's, say) do not matter.
func (s *Store) checkVersion(ctx context.Context) error {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	key := s.prefix + "version"
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(s.TenantsPrefix()), "=", 0).WithPrefix(),
			clientv3.Compare(clientv3.CreateRevision(s.idsPrefix()), "=", 0).WithPrefix()).
		Then(clientv3.OpPut(key, strconv.Itoa(FormatVersion))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return s.fail(ctx, "open "+s.prefix, err)
	}
	if resp.Succeeded {
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	if len(kvs) == 0 {
		return fmt.Errorf("%w: %s holds tenant keys but no format version", ErrFormat, s.prefix)
	}
	raw := kvs[0].Value
	v, err := strconv.ParseUint(string(raw), 10, 32)
	switch {
	case len(raw) > 10 || err != nil || v < 1:
		return fmt.Errorf("%w: %s has a malformed format version (%d bytes)", ErrFormat, key, len(raw))
	case v > FormatVersion:
		return fmt.Errorf("%w: %s has format version %d, this hsmd reads up to %d; upgrade hsmd",
			ErrVersion, s.prefix, v, FormatVersion)
	}
	return nil
}

// Client returns the store's etcd client, to share its connections with
// watches, leases and elections. If Open made it, the store owns it: do not
// close it, and do not use it after Close.
func (s *Store) Client() *clientv3.Client { return s.client }

// Prefix returns the prefix of every key of the store.
func (s *Store) Prefix() string { return s.prefix }

// TenantsPrefix returns the prefix of every tenant record, for watches.
func (s *Store) TenantsPrefix() string { return s.prefix + "tenants/" }

// idsPrefix is the prefix of the ID index.
func (s *Store) idsPrefix() string { return s.prefix + "tenant-ids/" }

// Revision returns the cluster's current revision: a watch of
// TenantsPrefix from Revision()+1 sees every change made after it. Errors
// are those of GetTenant.
func (s *Store) Revision(ctx context.Context) (int64, error) {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer end()
	resp, err := s.client.Get(ctx, s.prefix+"version", clientv3.WithCountOnly())
	if err != nil {
		return 0, s.fail(ctx, "revision", err)
	}
	return resp.Header.Revision, nil
}

// Close aborts running calls (they return store.ErrClosed), waits for them
// to return, and closes the client if Open made it. It is safe to call more
// than once and from several goroutines; calls after the first return nil.
func (s *Store) Close() error {
	s.cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.owned {
		if err := s.client.Close(); err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("etcd: close: %w", err)
		}
	}
	return nil
}

// begin starts a call: it returns a context bounded by ctx, the request
// timeout and Close, and a function to call when the call is over. It
// returns ctx.Err() if ctx is done, or store.ErrClosed.
func (s *Store) begin(ctx context.Context) (context.Context, func(), error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	s.mu.RLock()
	if s.closed || s.done.Err() != nil {
		s.mu.RUnlock()
		return nil, nil, errClosed
	}
	octx, cancel := context.WithTimeoutCause(ctx, s.timeout, errTimeout)
	stop := context.AfterFunc(s.done, cancel)
	return octx, func() {
		stop()
		cancel()
		s.mu.RUnlock()
	}, nil
}

// errTimeout is the cause of a call's context when the request timeout ends
// it.
var errTimeout = errors.New("etcd: request timeout")

// fail turns the error of an etcd call made with octx (from begin) into the
// store's: the caller's context error, store.ErrClosed, ErrUnavailable,
// store.ErrInvalid for a request etcd finds too large, or etcd's error. what
// names the operation.
func (s *Store) fail(octx context.Context, what string, err error) error {
	switch {
	case s.done.Err() != nil:
		return fmt.Errorf("etcd: %s: %w", what, store.ErrClosed)
	case errors.Is(context.Cause(octx), errTimeout):
		return fmt.Errorf("etcd: %s: %w: no answer within %s", what, ErrUnavailable, s.timeout)
	case octx.Err() != nil: // the caller's context ended
		return fmt.Errorf("etcd: %s: %w", what, octx.Err())
	case code(err) == codes.Unavailable:
		return fmt.Errorf("etcd: %s: %w: %w", what, ErrUnavailable, err)
	case tooLarge(err):
		return fmt.Errorf("etcd: %s: %w: %w", what, store.ErrInvalid, err)
	}
	return fmt.Errorf("etcd: %s: %w", what, err)
}

// tooLarge reports whether err refuses a request for its size: etcd's
// request size or transaction operation limits, or gRPC's message size
// limits (etcd's own ResourceExhausted errors, such as a full database, are
// not about the request).
func tooLarge(err error) bool {
	if errors.Is(err, rpctypes.ErrRequestTooLarge) || errors.Is(err, rpctypes.ErrTooManyOps) {
		return true
	}
	var etcdErr rpctypes.EtcdError
	return !errors.As(err, &etcdErr) && status.Code(err) == codes.ResourceExhausted
}

// code returns the gRPC code of an error from the etcd client.
func code(err error) codes.Code {
	var c interface{ Code() codes.Code }
	if errors.As(err, &c) {
		return c.Code()
	}
	return status.Code(err)
}
