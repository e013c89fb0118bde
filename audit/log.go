// Package audit is hsmd's own tamper-evident log: every call and every key
// event is an entry (JSON, see Entry) appended to a C2SP tlog-tiles Merkle
// tree kept by github.com/transparency-dev/tessera's POSIX driver, whose
// checkpoints (C2SP tlog-checkpoint signed notes) are signed by the signers
// the caller gives — in hsmd, HSM-held Ed25519 and ECDSA P-256 keys and an
// ML-DSA-44 key sealed under the HSM wrap key — and archived one after the
// other, so that Verify can check each against the entries and its
// predecessor.
//
// The log is fail-closed: Append fails with ErrUnavailable when an entry
// cannot be taken (the writer is failing, its queue stays full, or a
// durable entry is not confirmed within Config.Timeout), and the caller
// refuses the request. One writer goroutine hands entries to tessera in the
// order they were appended, but tessera may integrate one batch in two
// flushes in either order, so entries appended without waiting may land
// out of order; durable appends return once the entry is integrated into
// the tree on disk (fsync'd by tessera), so an entry appended after a
// durable one always follows it.
//
// The package never imports the HSM or the TPM: it takes note.Signers, a
// Wrapper for its two secrets (LoadKeys) and a MAC for its anchor (Bind,
// CheckAnchor).
package audit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/transparency-dev/tessera"
	"github.com/transparency-dev/tessera/storage/posix"
	"golang.org/x/mod/sumdb/note"
	"k8s.io/klog/v2"
)

// ErrUnavailable: the log cannot take the entry now; the request it
// records must fail (gRPC UNAVAILABLE).
var ErrUnavailable = errors.New("audit log unavailable")

// Layout of the audit directory.
const (
	// TreeDir holds the tessera POSIX log (tiles, entry bundles, the
	// newest checkpoint).
	TreeDir = "log"
	// CheckpointsFile archives every checkpoint the log published, in order.
	CheckpointsFile = "checkpoints"
	// AnchorFile ties the log's head to the TPM's rollback counter.
	AnchorFile = "anchor"
	// VerifiersFile lists the checkpoint verifier keys, one per line.
	VerifiersFile = "verifiers"
)

// Defaults of Config.
const (
	DefaultMaxBatch           = 1024
	DefaultLinger             = 10 * time.Millisecond
	DefaultQueueLimit         = 1 << 16
	DefaultTimeout            = 5 * time.Second
	DefaultCheckpointInterval = 5 * time.Second
)

// Config configures a Log. Dir and Signers are required.
type Config struct {
	// Dir is the audit directory (hsmd: <data-dir>/audit).
	Dir string
	// Signers sign each checkpoint, the first being tessera's primary; all
	// must share one name, which is the log's origin.
	Signers []note.Signer
	// Sync makes Append wait until the entry is durable for every entry,
	// not only for the durable ones (audit.sync).
	Sync bool
	// MaxBatch bounds the entries written in one go (default 1024).
	MaxBatch int
	// Linger is how long the writer waits for more entries before writing
	// a batch nobody waits for (default 10ms; negative: never). A durable
	// entry is written without lingering.
	Linger time.Duration
	// QueueLimit bounds the entries waiting to be written (default 65536);
	// Append waits for room at most Timeout.
	QueueLimit int
	// Timeout bounds how long Append waits for room in the queue and, for
	// a durable entry, for its confirmation (default 5s).
	Timeout time.Duration
	// CheckpointInterval is how often a grown log publishes a new
	// checkpoint (default 5s, at least 100ms).
	CheckpointInterval time.Duration
	// OnWrite, if set, is called after each attempt to write a batch of n
	// entries, with its duration and error.
	OnWrite func(n int, d time.Duration, err error)
	Now     func() time.Time
	Logger  *slog.Logger
}

// Log is hsmd's audit log. It is safe for concurrent use.
type Log struct {
	cfg      Config
	origin   string
	treeDir  string
	add      tessera.AddFn
	reader   tessera.LogReader
	shutdown func(context.Context) error
	cancel   context.CancelFunc
	archive  *archive

	queue   chan *pending
	stop    chan struct{}
	stopped chan struct{}
	closed  atomic.Bool

	// writeMu is held while a batch is written and while the head is read,
	// so that the head's tiles are not replaced underneath.
	writeMu sync.Mutex
	size    atomic.Uint64 // entries durably in the tree

	errMu sync.Mutex
	err   error // the last write's error while failing, else nil
}

type pending struct {
	e    Entry
	done chan error // nil if nobody waits
}

// Open opens (creating if needed) the log in cfg.Dir and starts its writer.
// Close it to flush the queue and publish a final checkpoint.
func Open(ctx context.Context, cfg Config) (*Log, error) {
	if cfg.Dir == "" || len(cfg.Signers) == 0 {
		return nil, errors.New("audit: Config.Dir and Config.Signers are required")
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = DefaultMaxBatch
	}
	if cfg.QueueLimit <= 0 {
		cfg.QueueLimit = DefaultQueueLimit
	}
	if cfg.Linger == 0 {
		cfg.Linger = DefaultLinger
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.CheckpointInterval <= 0 {
		cfg.CheckpointInterval = DefaultCheckpointInterval
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	l := &Log{
		cfg:     cfg,
		origin:  cfg.Signers[0].Name(),
		treeDir: filepath.Join(cfg.Dir, TreeDir),
		queue:   make(chan *pending, cfg.QueueLimit),
		stop:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	if err := os.MkdirAll(l.treeDir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	var err error
	if l.archive, err = openArchive(filepath.Join(cfg.Dir, CheckpointsFile)); err != nil {
		return nil, err
	}
	signers := l.archive.capture(cfg.Signers)
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	l.cancel = cancel
	driver, err := posix.New(bg, posix.Config{Path: l.treeDir})
	if err != nil {
		l.abort()
		return nil, fmt.Errorf("audit: open the log: %w", err)
	}
	opts := tessera.NewAppendOptions().
		WithCheckpointSigner(signers[0], signers[1:]...).
		// The writer hands over whole batches: flush them at once.
		WithBatching(uint(cfg.MaxBatch), time.Millisecond).
		WithCheckpointInterval(cfg.CheckpointInterval).
		WithCheckpointRepublishInterval(0)
	a, shutdown, reader, err := tessera.NewAppender(bg, driver, opts)
	if err != nil {
		l.abort()
		return nil, fmt.Errorf("audit: open the log: %w", err)
	}
	l.add, l.reader, l.shutdown = a.Add, reader, shutdown
	n, err := reader.IntegratedSize(bg)
	if err != nil {
		l.abort()
		return nil, fmt.Errorf("audit: read the log size: %w", err)
	}
	l.size.Store(n)
	if last := l.archive.lastSize; last > n {
		l.abort()
		return nil, fmt.Errorf("audit: the checkpoint archive is at size %d, the tree at %d: the tree was truncated", last, n)
	}
	go l.run(bg)
	return l, nil
}

func (l *Log) abort() {
	l.cancel()
	l.archive.close()
}

// Origin returns the log's origin (the checkpoints' first line).
func (l *Log) Origin() string { return l.origin }

// Size returns the number of entries durably in the log.
func (l *Log) Size() uint64 { return l.size.Load() }

// Err returns nil while the log takes entries, else why it does not.
func (l *Log) Err() error {
	if l.closed.Load() {
		return fmt.Errorf("%w: closed", ErrUnavailable)
	}
	l.errMu.Lock()
	defer l.errMu.Unlock()
	if l.err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, l.err)
	}
	return nil
}

func (l *Log) setErr(err error) {
	l.errMu.Lock()
	l.err = err
	l.errMu.Unlock()
}

// Append records e (its Time is set here). It returns once the
// entry is queued, or, if durable or Config.Sync, once it is durably in
// the tree. It fails with ErrUnavailable, and the caller must refuse the
// request the entry records, when the log is failing, its queue stays full
// for Config.Timeout, or a durable entry is not confirmed within it (the
// entry may still be written later).
func (l *Log) Append(ctx context.Context, e Entry, durable bool) error {
	if err := l.Err(); err != nil {
		return err
	}
	e.Time = l.cfg.Now().UTC()
	p := &pending{e: e}
	var done chan error // p.done belongs to the writer once p is queued
	if durable || l.cfg.Sync {
		done = make(chan error, 1)
		p.done = done
	}
	var timeout <-chan time.Time
	select {
	case l.queue <- p:
	default:
		t := time.NewTimer(l.cfg.Timeout)
		defer t.Stop()
		timeout = t.C
		select {
		case l.queue <- p:
		case <-timeout:
			return fmt.Errorf("%w: queue full for %v", ErrUnavailable, l.cfg.Timeout)
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ErrUnavailable, ctx.Err())
		}
	}
	if done == nil {
		return nil
	}
	if timeout == nil {
		t := time.NewTimer(l.cfg.Timeout)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case err := <-done:
		return err
	case <-timeout:
		return fmt.Errorf("%w: entry not confirmed within %v", ErrUnavailable, l.cfg.Timeout)
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", ErrUnavailable, ctx.Err())
	}
}

// Close stops taking entries, writes those queued (giving up after
// Config.Timeout if the log is failing), waits for tessera to publish a
// checkpoint covering them, and releases the log.
func (l *Log) Close(ctx context.Context) error {
	if l.closed.Swap(true) {
		return nil
	}
	close(l.stop)
	<-l.stopped
	err := l.shutdown(ctx)
	l.cancel()
	if cerr := l.archive.close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("audit: close: %w", err)
	}
	return nil
}

// run is the single writer: it takes batches from the queue and writes
// them in order, retrying a failed batch (new entries are refused
// meanwhile) until it succeeds or the log is closed.
func (l *Log) run(ctx context.Context) {
	defer close(l.stopped)
	var batch []*pending
	backoff := 50 * time.Millisecond
	var stopping <-chan time.Time
	for {
		if len(batch) == 0 {
			select {
			case p := <-l.queue:
				batch = append(batch, p)
			case <-l.stop:
				if len(l.queue) == 0 {
					return
				}
				continue
			}
		}
		batch = l.gather(batch)
		start := time.Now()
		written, err := l.write(ctx, batch)
		if f := l.cfg.OnWrite; f != nil {
			f(len(batch), time.Since(start), err)
		}
		rest := batch[:0]
		for i, p := range batch {
			if written[i] {
				p.notify(nil)
			} else {
				rest = append(rest, p)
			}
		}
		clear(batch[len(rest):])
		batch = rest
		if err == nil {
			l.setErr(nil)
			backoff = 50 * time.Millisecond
			continue
		}
		l.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit log write failed; refusing requests until it recovers",
			slog.Int("pending", len(batch)), slog.Any("error", err))
		l.setErr(err)
		for _, p := range batch {
			p.notify(fmt.Errorf("%w: %v", ErrUnavailable, err))
		}
		if stopping == nil {
			select {
			case <-l.stop:
				stopping = time.After(l.cfg.Timeout)
			default:
			}
		}
		select {
		case <-time.After(backoff):
			backoff = min(2*backoff, time.Second)
		case <-stopping:
			l.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit log closed with entries it could not write",
				slog.Int("lost", len(batch)+len(l.queue)))
			return
		}
	}
}

// gather adds queued entries to batch, up to MaxBatch. While nobody waits
// for an entry of the batch, it lingers up to Config.Linger for more, so
// that a steady data plane is written in fewer, larger writes (each costs
// a few synchronous file writes whatever its size).
func (l *Log) gather(batch []*pending) []*pending {
	waited := slices.ContainsFunc(batch, func(p *pending) bool { return p.done != nil })
	var linger <-chan time.Time
	for len(batch) < l.cfg.MaxBatch {
		select {
		case p := <-l.queue:
			batch = append(batch, p)
			waited = waited || p.done != nil
			continue
		default:
		}
		if waited || l.cfg.Linger <= 0 {
			return batch
		}
		if linger == nil {
			t := time.NewTimer(l.cfg.Linger)
			defer t.Stop()
			linger = t.C
		}
		select {
		case p := <-l.queue:
			batch = append(batch, p)
			waited = waited || p.done != nil
		case <-linger:
			return batch
		case <-l.stop:
			return batch
		}
	}
	return batch
}

// notify tells a waiting Append the outcome, once.
func (p *pending) notify(err error) {
	if p.done != nil {
		p.done <- err
		p.done = nil
	}
}

// write appends batch to the tree in order and reports which entries are
// durably written, and the error that stopped the others.
func (l *Log) write(ctx context.Context, batch []*pending) ([]bool, error) {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	// Build every entry (marshalling and hashing) before handing them over
	// in a tight loop, so that tessera's queue flushes them together.
	entries := make([]*tessera.Entry, len(batch))
	for i, p := range batch {
		b, err := p.e.marshal()
		if err != nil {
			// Cannot happen for entries hsmd makes (their fields are
			// bounded); record that something was refused instead.
			b, _ = (&Entry{Time: p.e.Time, Kind: p.e.Kind, RequestID: p.e.RequestID,
				Method: p.e.Method, Code: p.e.Code, Detail: "entry too large; fields dropped"}).marshal()
		}
		entries[i] = tessera.NewEntry(b)
	}
	futures := make([]tessera.IndexFuture, len(batch))
	for i, e := range entries {
		futures[i] = l.add(ctx, e)
	}
	written := make([]bool, len(batch))
	var ferr error
	size := l.size.Load()
	for i, f := range futures {
		idx, err := f()
		if err != nil {
			if ferr == nil {
				ferr = err
			}
			continue
		}
		written[i] = true
		size = max(size, idx.Index+1)
	}
	if ferr == nil {
		l.size.Store(size)
		return written, nil
	}
	n, err := l.reader.IntegratedSize(ctx)
	if err != nil {
		// The outcome is unknown: keep the last known size.
		return written, fmt.Errorf("%v (and reading the tree size: %v)", ferr, err)
	}
	l.size.Store(n)
	return written, ferr
}

var quietOnce sync.Once

// QuietTessera sends the log lines of tessera (klog) to logger at debug
// level, or discards them if logger is nil. klog's logger is process-wide
// and not safe to change while tessera runs, so only the first call has an
// effect: make it before the first Open.
func QuietTessera(logger ...*slog.Logger) {
	quietOnce.Do(func() {
		if len(logger) > 0 && logger[0] != nil {
			klog.SetSlogLogger(slog.New(debugOnly{logger[0].Handler()}))
			return
		}
		klog.SetSlogLogger(slog.New(slog.DiscardHandler))
	})
}

// debugOnly lowers every record to debug level.
type debugOnly struct{ slog.Handler }

func (d debugOnly) Enabled(ctx context.Context, _ slog.Level) bool {
	return d.Handler.Enabled(ctx, slog.LevelDebug)
}

func (d debugOnly) Handle(ctx context.Context, r slog.Record) error {
	r.Level = slog.LevelDebug
	return d.Handler.Handle(ctx, r)
}

func (d debugOnly) WithAttrs(a []slog.Attr) slog.Handler { return debugOnly{d.Handler.WithAttrs(a)} }
func (d debugOnly) WithGroup(g string) slog.Handler      { return debugOnly{d.Handler.WithGroup(g)} }
