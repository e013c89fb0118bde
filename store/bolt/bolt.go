// Package bolt is the embedded, single-node implementation of store.Store,
// kept in one go.etcd.io/bbolt file.
//
// # Layout
//
// The file holds four top-level buckets:
//
//	meta     "version" → format version, 8-byte big-endian (FormatVersion)
//	         "state"   → the sealed state (store.EncodeState), sealed stores only
//	tenants  tenant name → record (JSON, see below)
//	ids      tenant ID, 8-byte big-endian → tenant name
//	macs     tenant name → the record's MAC (store.RecordMAC), sealed stores only
//
// A record is the JSON object {"revision": N, "tenant": T}, where T is the
// encoding/json form of store.Tenant (its struct tags fix the field names;
// the salt is an array of 32 numbers). Times are stored in UTC with
// nanosecond precision (RFC 3339). The revision is a per-record counter: 1
// when the tenant is created, incremented by every UpdateTenant.
//
// # Format versions
//
// Open writes FormatVersion into a new file and refuses a file whose version
// is newer (ErrVersion) or that is not an hsmd store (ErrFormat). A change to
// the layout or the record encoding must bump FormatVersion and teach Open to
// read the older versions.
//
// # Concurrency
//
// A *Store is safe for concurrent use by many goroutines. Only one process
// may open a file at a time: bbolt holds an exclusive lock on it, and a second
// Open waits at most Options.LockTimeout before failing with ErrLocked.
// Writes are serialised by bbolt, each in its own fsync'd transaction; reads
// run concurrently in read-only transactions.
package bolt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	bbolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/hsmd/hsmd/store"
)

// FormatVersion is the version of the file layout written by this package.
const FormatVersion = 1

// DefaultLockTimeout is how long Open waits for the file lock when
// Options.LockTimeout is zero.
const DefaultLockTimeout = time.Second

// FileMode is the permission of a database file that Open creates.
const FileMode = 0o600

// Errors returned by Open, in addition to the errors of package store.
var (
	// ErrLocked: another process (or another Store in this process) holds
	// the database file open.
	ErrLocked = errors.New("bolt: database is locked by another process")
	// ErrVersion: the file was written by a newer hsmd with a format this
	// package does not know.
	ErrVersion = errors.New("bolt: unsupported format version")
	// ErrFormat: the file is a bbolt database but not a valid hsmd store.
	ErrFormat = errors.New("bolt: not an hsmd store")
)

var (
	bucketMeta    = []byte("meta")
	bucketTenants = []byte("tenants")
	bucketIDs     = []byte("ids")
	bucketMACs    = []byte("macs") // tenant name → record MAC (sealed stores)
	keyVersion    = []byte("version")
	keyState      = []byte("state") // in meta: the sealed state
)

// Options configure Open. The zero value is ready to use.
type Options struct {
	// LockTimeout bounds the wait for the exclusive file lock. Zero means
	// DefaultLockTimeout; a negative value is an error (bbolt would wait
	// forever).
	LockTimeout time.Duration
	// Sealer, if set, authenticates every record and binds the store to
	// the rollback counter (see store.Sealed). Without it the store keeps
	// no MACs: only before init, or with --insecure-no-tpm.
	Sealer store.Sealer
}

// Store is a store.Store kept in a bbolt file. It is safe for concurrent
// use. The caller of Open must call Close; Close is safe to call twice, and
// every other method returns store.ErrClosed after it.
type Store struct {
	// mu guards db against Close: methods hold it for reading while they
	// use db, Close holds it for writing. It is never held across a
	// call back into user code.
	mu     sync.RWMutex
	db     *bbolt.DB // nil once closed
	path   string
	closed bool
	sealer store.Sealer
}

// Open opens the store in the file at path, creating the file (mode 0600)
// and its buckets if it does not exist. The directory must exist.
//
// Open returns ErrLocked if another process holds the file for longer than
// opts.LockTimeout, ErrVersion if the file has a newer format, ErrFormat if
// it is not an hsmd store, or another error from the file system or bbolt.
// The caller must call Close on the returned Store.
func Open(path string, opts Options) (*Store, error) {
	timeout := opts.LockTimeout
	switch {
	case timeout == 0:
		timeout = DefaultLockTimeout
	case timeout < 0:
		return nil, fmt.Errorf("bolt: open %s: negative lock timeout %s", path, timeout)
	}
	db, err := bbolt.Open(path, FileMode, &bbolt.Options{Timeout: timeout})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s (gave up after %s; is another hsmd running?)", ErrLocked, path, timeout)
	}
	if err != nil {
		return nil, fmt.Errorf("bolt: open %s: %w", path, err)
	}
	if err := db.Update(initBuckets); err != nil {
		db.Close()
		return nil, fmt.Errorf("bolt: open %s: %w", path, err)
	}
	return &Store{db: db, path: path, sealer: opts.Sealer}, nil
}

// initBuckets creates the buckets of an empty file, or checks the format
// version and the buckets of an existing one.
func initBuckets(tx *bbolt.Tx) error {
	if name, _ := tx.Cursor().First(); name == nil {
		return createBuckets(tx)
	}
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		return fmt.Errorf("%w: no %q bucket", ErrFormat, bucketMeta)
	}
	raw := meta.Get(keyVersion)
	if len(raw) != 8 {
		return fmt.Errorf("%w: malformed format version (%d bytes)", ErrFormat, len(raw))
	}
	switch v := binary.BigEndian.Uint64(raw); {
	case v > FormatVersion:
		return fmt.Errorf("%w: the file has format version %d, this hsmd reads up to %d; upgrade hsmd",
			ErrVersion, v, FormatVersion)
	case v < 1:
		return fmt.Errorf("%w: format version %d", ErrFormat, v)
	}
	for _, b := range [][]byte{bucketTenants, bucketIDs} {
		if tx.Bucket(b) == nil {
			return fmt.Errorf("%w: no %q bucket", ErrFormat, b)
		}
	}
	_, err := tx.CreateBucketIfNotExists(bucketMACs) // added after format 1 shipped; compatible
	return err
}

func createBuckets(tx *bbolt.Tx) error {
	meta, err := tx.CreateBucket(bucketMeta)
	if err != nil {
		return err
	}
	if err := meta.Put(keyVersion, binary.BigEndian.AppendUint64(nil, FormatVersion)); err != nil {
		return err
	}
	for _, b := range [][]byte{bucketTenants, bucketIDs, bucketMACs} {
		if _, err := tx.CreateBucket(b); err != nil {
			return err
		}
	}
	return nil
}

// Path returns the file the store was opened from.
func (s *Store) Path() string { return s.path }

// Close waits for running operations to finish, then releases the file and
// its lock. It is safe to call more than once and from several goroutines;
// calls after the first return nil.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.db.Close()
	s.db = nil
	if err != nil {
		return fmt.Errorf("bolt: close %s: %w", s.path, err)
	}
	return nil
}

// view runs fn in a read-only transaction, or returns store.ErrClosed.
func (s *Store) view(fn func(tx *bbolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return errClosed
	}
	return s.db.View(fn)
}

// update runs fn in a read-write transaction, or returns store.ErrClosed.
func (s *Store) update(fn func(tx *bbolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return errClosed
	}
	return s.db.Update(fn)
}
