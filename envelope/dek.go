package envelope

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"io"
	"time"

	"github.com/hsmd/hsmd/envelope/wire"
)

// dek is a derived data key, ready to use. Its raw bytes were cleared when
// the AEAD was built (see the package doc on erasure).
type dek struct {
	aead cipher.AEAD
	born time.Time
}

// sealEntry is the data key a tenant version currently seals with, and how
// much it has sealed. lock (a one-slot channel, so waiting honours ctx)
// serialises the check-and-reserve, and the derivation of a new key, per
// tenant version.
type sealEntry struct {
	lock  chan struct{}
	seed  [wire.SeedSize]byte
	key   *dek
	items uint64
	bytes uint64
}

// Cache keys hold the whole KeyRef, so a key derived from other material
// (another salt or kdk version) is never found.
type (
	sealKey = KeyRef
	openKey struct {
		ref  KeyRef
		seed [wire.SeedSize]byte
	}
)

// derive asks the Deriver for the input key material of (ref, seed) and
// expands it into an AES-256-GCM key (docs/FORMAT.md, suite 0x01).
func (e *Engine) derive(ctx context.Context, ref *KeyRef, seed [wire.SeedSize]byte) (*dek, error) {
	var buf [128]byte
	msg := wire.AppendDEKMessage(buf[:0], ref.Tenant, ref.TenantID, ref.Version, ref.Salt[:], seed)
	ikm, err := e.cfg.Deriver.PRF(ctx, ref.KDKVersion, msg)
	if err != nil {
		e.stats.deriveErrors.Add(1)
		return nil, fmt.Errorf("%w: %w", ErrDerive, err)
	}
	defer clear(ikm)
	if len(ikm) != sha256.Size {
		e.stats.deriveErrors.Add(1)
		return nil, fmt.Errorf("%w: the PRF returned %d bytes, want %d", ErrDerive, len(ikm), sha256.Size)
	}
	var key [32]byte
	okm, err := hkdf.Key(sha256.New, ikm, nil, wire.SuiteLabel, len(key))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDerive, err)
	}
	copy(key[:], okm)
	clear(okm)
	defer clear(key[:])
	block, err := aes.NewCipher(key[:])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDerive, err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDerive, err)
	}
	e.stats.derivations.Add(1)
	return &dek{aead: aead, born: e.cfg.Now()}, nil
}

// sealingKey reserves room for n items of b bytes under ref's current data
// key, drawing a new seed when the current one is used up, expired, or was
// derived for other key material. It returns the key and its seed.
func (e *Engine) sealingKey(ctx context.Context, ref *KeyRef, n, b uint64) (*dek, [wire.SeedSize]byte, error) {
	lim := e.cfg.Limits
	if n > lim.MaxItems || b > lim.MaxBytes {
		return nil, [wire.SeedSize]byte{}, fmt.Errorf("envelope: batch of %d items, %d bytes exceeds the per-key limits (%d items, %d bytes)", n, b, lim.MaxItems, lim.MaxBytes)
	}
	ent, ok := e.sealKeys.Get(*ref)
	if !ok {
		ent = &sealEntry{lock: make(chan struct{}, 1)}
		if prev, found, _ := e.sealKeys.PeekOrAdd(*ref, ent); found {
			ent = prev
		}
	}
	select {
	case ent.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, [wire.SeedSize]byte{}, ctx.Err()
	}
	defer func() { <-ent.lock }()
	if ent.key != nil && ent.items+n <= lim.MaxItems && ent.bytes+b <= lim.MaxBytes &&
		e.cfg.Now().Sub(ent.key.born) < lim.MaxAge {
		ent.items += n
		ent.bytes += b
		e.stats.sealHits.Add(1)
		return ent.key, ent.seed, nil
	}
	var seed [wire.SeedSize]byte
	if _, err := io.ReadFull(e.rand, seed[:]); err != nil {
		return nil, seed, fmt.Errorf("envelope: draw seed: %w", err)
	}
	key, err := e.derive(ctx, ref, seed)
	if err != nil {
		return nil, seed, err
	}
	e.stats.sealMisses.Add(1)
	if e.cfg.OnSealKey != nil {
		e.cfg.OnSealKey(*ref)
	}
	ent.seed, ent.key, ent.items, ent.bytes = seed, key, n, b
	e.openKeys.Add(openKey{*ref, seed}, key)
	return key, seed, nil
}

// openingKey returns the data key of (ref, seed) from the cache, or
// derives it (fresh: the caller caches it once it has proved useful). A
// cached key is used until it expires.
func (e *Engine) openingKey(ctx context.Context, ref *KeyRef, seed [wire.SeedSize]byte) (key *dek, fresh bool, err error) {
	if d, ok := e.openKeys.Get(openKey{*ref, seed}); ok && e.cfg.Now().Sub(d.born) < e.cfg.Limits.MaxAge {
		e.stats.openHits.Add(1)
		return d, false, nil
	}
	d, err := e.derive(ctx, ref, seed)
	if err != nil {
		return nil, false, err
	}
	e.stats.openMisses.Add(1)
	return d, true, nil
}
