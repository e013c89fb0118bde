package envelope

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/hsmd/hsmd/envelope/wire"
)

// Errors. Test with errors.Is.
var (
	// ErrDecrypt is the one error for an item that fails to open: wrong
	// tag, tenant, context or key, or an unknown key. It carries no detail.
	ErrDecrypt = errors.New("message authentication failed")
	// ErrMalformed: the item is not a ciphertext (see wire.ErrMalformed).
	ErrMalformed = wire.ErrMalformed
	// ErrDerive: a data key could not be derived (the Deriver failed).
	ErrDerive = errors.New("envelope: cannot derive data key")
	// ErrTooManyGroups: a batch to open spans more data keys than
	// Config.MaxGroups allows.
	ErrTooManyGroups = errors.New("envelope: too many data keys in one batch")
	// ErrUnknownKey is returned by a Resolver for a tenant id or key
	// version it does not know; Open reports it as ErrDecrypt.
	ErrUnknownKey = errors.New("envelope: unknown key")
)

// Defaults of Config.
const (
	DefaultMaxItems         = 1 << 24
	DefaultMaxBytes         = 1 << 36
	DefaultMaxAge           = 10 * time.Minute
	DefaultCacheSize        = 4096
	DefaultParallelMinBytes = 256 << 10
	DefaultMaxGroups        = 1000
	// MaxItemSize is the largest plaintext the format carries.
	MaxItemSize = 1<<31 - 1
)

// KeyRef names one tenant key version and what its data keys derive from.
// It is resolved from the metadata store by the caller.
type KeyRef struct {
	Tenant     string // 1 to 64 bytes
	TenantID   uint64
	Version    uint32
	KDKVersion uint32
	Salt       [32]byte
}

// Limits bound how much one data key (one seed) encrypts.
type Limits struct {
	MaxItems uint64        // default DefaultMaxItems
	MaxBytes uint64        // default DefaultMaxBytes
	MaxAge   time.Duration // default DefaultMaxAge; also the DEK cache TTL
}

// Config configures an Engine. Deriver is required.
type Config struct {
	Deriver Deriver
	Limits  Limits
	// CacheSize bounds each of the two DEK caches (sealing: one entry per
	// tenant version; opening: one per seed). Default DefaultCacheSize.
	CacheSize int
	// Workers seal or open a large batch in parallel; default GOMAXPROCS.
	// 1 disables parallelism.
	Workers int
	// ParallelMinBytes is the batch size (plaintext bytes) from which
	// batches are split across workers.
	ParallelMinBytes int
	// MaxGroups bounds the distinct data keys (tenant, version, seed) one
	// batch to open may span, and so the Deriver calls one Open can cost.
	// Default DefaultMaxGroups.
	MaxGroups int
	// OnSealKey, if set, is called (synchronously: keep it short) each
	// time a new data key is derived to seal under ref, for usage limits.
	OnSealKey func(ref KeyRef)
	// Rand, if set, draws seeds and nonces (a test seam). By default seeds
	// come from crypto/rand, and so do nonces for small batches; a large
	// batch draws its nonces from ChaCha8 streams keyed from crypto/rand
	// (see nonces.go).
	Rand io.Reader
	// Now is the clock; default time.Now.
	Now func() time.Time
	// XWing, if set, gives the X-Wing private keys that open suite 0x02
	// items (offline HPKE producers); without it such items fail with
	// ErrDecrypt. Its keys are cached (CacheSize entries, MaxAge).
	XWing XWingKeys
}

// Engine seals and opens batches. It is safe for concurrent use.
type Engine struct {
	cfg      Config
	rand     io.Reader // cfg.Rand or crypto/rand
	sealKeys *lru.Cache[sealKey, *sealEntry]
	openKeys *lru.Cache[openKey, *dek]
	// xwingKeys caches X-Wing private keys by key version.
	xwingKeys *lru.Cache[KeyRef, *xwingEntry]
	stats     stats
}

// New returns an Engine, filling in the defaults of zero fields. It fails
// only if cfg.Deriver is nil. The Engine holds no resources: there is
// nothing to close.
func New(cfg Config) (*Engine, error) {
	if cfg.Deriver == nil {
		return nil, errors.New("envelope: Config.Deriver is required")
	}
	setDefault(&cfg.Limits.MaxItems, DefaultMaxItems)
	setDefault(&cfg.Limits.MaxBytes, DefaultMaxBytes)
	setDefault(&cfg.Limits.MaxAge, DefaultMaxAge)
	setDefault(&cfg.CacheSize, DefaultCacheSize)
	setDefault(&cfg.Workers, runtime.GOMAXPROCS(0))
	setDefault(&cfg.ParallelMinBytes, DefaultParallelMinBytes)
	setDefault(&cfg.MaxGroups, DefaultMaxGroups)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	sk, err := lru.New[sealKey, *sealEntry](cfg.CacheSize)
	if err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	ok, err := lru.New[openKey, *dek](cfg.CacheSize)
	if err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	xk, err := lru.New[KeyRef, *xwingEntry](cfg.CacheSize)
	if err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	r := cfg.Rand
	if r == nil {
		r = rand.Reader
	}
	return &Engine{cfg: cfg, rand: r, sealKeys: sk, openKeys: ok, xwingKeys: xk}, nil
}

func setDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}

// Stats counts cache behaviour and derivations since the Engine was made.
type Stats struct {
	SealHits, SealMisses uint64 // batches sealed with a cached / a new DEK
	OpenHits, OpenMisses uint64 // groups opened with a cached / a derived DEK
	Derivations          uint64 // Deriver calls that succeeded
	DeriveErrors         uint64
	// XWingHits, XWingMisses: groups of suite 0x02 items opened with a
	// cached X-Wing private key / one fetched from Config.XWing.
	XWingHits, XWingMisses uint64
	// SealCached, OpenCached: entries in the two DEK caches now (each at
	// most Config.CacheSize).
	SealCached, OpenCached int
}

type stats struct {
	sealHits, sealMisses, openHits, openMisses, derivations, deriveErrors atomic.Uint64
	xwingHits, xwingMisses                                                atomic.Uint64
}

// Stats returns a snapshot of the counters.
func (e *Engine) Stats() Stats {
	s := &e.stats
	return Stats{
		SealHits: s.sealHits.Load(), SealMisses: s.sealMisses.Load(),
		OpenHits: s.openHits.Load(), OpenMisses: s.openMisses.Load(),
		Derivations: s.derivations.Load(), DeriveErrors: s.deriveErrors.Load(),
		XWingHits: s.xwingHits.Load(), XWingMisses: s.xwingMisses.Load(),
		SealCached: e.sealKeys.Len(), OpenCached: e.openKeys.Len(),
	}
}

// Forget drops every cached data key of a tenant version, for example when
// it is disabled. Keys in use by calls already running finish their work.
func (e *Engine) Forget(tenantID uint64, version uint32) {
	for _, k := range e.sealKeys.Keys() {
		if k.TenantID == tenantID && k.Version == version {
			e.sealKeys.Remove(k)
		}
	}
	for _, k := range e.openKeys.Keys() {
		if k.ref.TenantID == tenantID && k.ref.Version == version {
			e.openKeys.Remove(k)
		}
	}
	for _, k := range e.xwingKeys.Keys() {
		if k.TenantID == tenantID && k.Version == version {
			e.xwingKeys.Remove(k)
		}
	}
}

// parallel runs fn over [0, n) split into contiguous ranges, on up to
// Workers goroutines when the batch holds at least ParallelMinBytes.
func (e *Engine) parallel(n, bytes int, fn func(lo, hi int)) {
	w := e.cfg.Workers
	if w > n {
		w = n
	}
	if w <= 1 || bytes < e.cfg.ParallelMinBytes {
		fn(0, n)
		return
	}
	done := make(chan struct{}, w-1)
	per := (n + w - 1) / w
	for lo := per; lo < n; lo += per {
		go func(lo, hi int) {
			fn(lo, hi)
			done <- struct{}{}
		}(lo, min(lo+per, n))
	}
	fn(0, min(per, n))
	for lo := per; lo < n; lo += per {
		<-done
	}
}
