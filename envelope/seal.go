package envelope

import (
	"context"
	"fmt"

	"github.com/hsmd/hsmd/envelope/wire"
)

// Item is a record to seal. Context is bound to the ciphertext as
// additional authenticated data; opening needs the same map.
type Item struct {
	Plaintext []byte
	Context   map[string]string
}

// SealedSize returns the bytes that sealing items takes: their plaintexts
// plus wire.Overhead each.
func SealedSize(items []Item) int {
	n := len(items) * wire.Overhead
	for i := range items {
		n += len(items[i].Plaintext)
	}
	return n
}

// Seal encrypts every item under ref's current data key and returns one
// binary ciphertext per item, in order. The ciphertexts share one
// allocation. A batch costs at most one Deriver call, and none while the
// tenant version's current seed has room under the Limits.
//
// Errors: ctx's error; an error wrapping ErrDerive if a new data key was
// needed and could not be derived; an error for a tenant name of the wrong
// size, an item over MaxItemSize or a batch over the per-key limits (callers
// cap sizes well below these). Nothing is sealed on error.
func (e *Engine) Seal(ctx context.Context, ref KeyRef, items []Item) ([][]byte, error) {
	out := make([][]byte, len(items))
	if err := e.SealTo(ctx, ref, items, make([]byte, SealedSize(items)), out); err != nil {
		return nil, err
	}
	return out, nil
}

// SealTo is Seal into memory the caller provides, for callers that reuse
// buffers: slab must hold at least SealedSize(items) bytes, and out gets
// one ciphertext per item, each a slice of slab. It panics if out is not as
// long as items or slab is too short.
func (e *Engine) SealTo(ctx context.Context, ref KeyRef, items []Item, slab []byte, out [][]byte) error {
	if len(out) != len(items) || len(slab) < SealedSize(items) {
		panic("envelope: SealTo: out or slab too short")
	}
	off := 0
	for i := range items {
		n := len(items[i].Plaintext) + wire.Overhead
		out[i] = slab[off : off+n : off+n]
		off += n
	}
	return e.SealInto(ctx, ref, items, out)
}

// SealInto is Seal into slices the caller placed: out[i] must be exactly
// len(items[i].Plaintext)+Overhead bytes long (a gRPC server writes the
// ciphertexts straight into its response's wire form this way). It panics
// if out is not as long as items or an out[i] has the wrong length.
func (e *Engine) SealInto(ctx context.Context, ref KeyRef, items []Item, out [][]byte) error {
	if len(out) != len(items) {
		panic("envelope: SealInto: out and items differ in length")
	}
	for i := range items {
		if len(out[i]) != len(items[i].Plaintext)+wire.Overhead {
			panic("envelope: SealInto: out[i] is not the item's sealed size")
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if len(ref.Tenant) == 0 || len(ref.Tenant) > wire.MaxTenantLen {
		return fmt.Errorf("envelope: tenant name of %d bytes, want 1 to %d", len(ref.Tenant), wire.MaxTenantLen)
	}
	if ref.TenantID == 0 || ref.Version == 0 {
		return fmt.Errorf("envelope: tenant id and key version must not be zero")
	}
	total := 0
	for i := range items {
		n := len(items[i].Plaintext)
		if n > MaxItemSize {
			return fmt.Errorf("envelope: item %d is %d bytes, the format's maximum is %d", i, n, MaxItemSize)
		}
		total += n
	}
	key, seed, err := e.sealingKey(ctx, &ref, uint64(len(items)), uint64(total))
	if err != nil {
		return err
	}
	nonces, err := e.nonceSource(len(items))
	if err != nil {
		return err
	}
	var tmpl [wire.HeaderSize]byte
	hdr := wire.Header{Version: wire.Version1, Suite: wire.SuiteAES256GCM, TenantID: ref.TenantID, KeyVersion: ref.Version, Seed: seed}
	hdr.Put(tmpl[:])
	e.parallel(len(items), total, func(lo, hi int) {
		// The AAD is the header, the tenant and the context: build it once
		// and change only the nonce per item; items with a context get a
		// copy with their context appended.
		var aadBuf, ctxBuf [256]byte
		noContext := wire.AppendAAD(aadBuf[:0], tmpl[:], ref.Tenant, nil)
		ctxAt := len(noContext) - 4
		gen := nonces.worker()
		for i := lo; i < hi; i++ {
			ct := out[i]
			nonce := ct[wire.HeaderSize-wire.NonceSize : wire.HeaderSize]
			copy(ct, tmpl[:wire.HeaderSize-wire.NonceSize])
			gen.fill(i, nonce)
			copy(noContext[wire.HeaderSize-wire.NonceSize:], nonce)
			aad := noContext
			if len(items[i].Context) > 0 {
				aad = wire.AppendContext(append(ctxBuf[:0], noContext[:ctxAt]...), items[i].Context)
			}
			key.aead.Seal(ct[wire.HeaderSize:wire.HeaderSize], nonce, items[i].Plaintext, aad)
		}
	})
	return nil
}
