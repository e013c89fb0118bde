package envelope

import (
	"context"
	"errors"

	"github.com/hsmd/hsmd/envelope/wire"
)

// Ciphertext is a record to open: a binary ciphertext or its text form, and
// the context it was sealed with.
type Ciphertext struct {
	Data    []byte
	Context map[string]string
}

// Opened is the result of opening one item: Plaintext, or Err.
type Opened struct {
	Plaintext []byte
	Err       error
}

// Resolver returns the KeyRef of a ciphertext's tenant id and key version.
// It returns an error wrapping ErrUnknownKey for an id or version it does
// not know, or that the caller may not use (for example another tenant than
// the one the request names); Open reports those items as ErrDecrypt. Any
// other error is reported as is for the items concerned.
type Resolver func(ctx context.Context, tenantID uint64, version uint32) (KeyRef, error)

// parsed is one item after its header was read.
type parsed struct {
	raw  []byte // binary ciphertext
	hdr  wire.Header
	key  *dek
	ref  *KeyRef
	size int // plaintext size
}

// Open decrypts every item and reports each on its own, in order: one bad
// item does not fail the others. Items are grouped by (tenant, version,
// seed), and each group costs at most one Deriver call (none if its key is
// cached). The plaintexts share one allocation.
//
// Per-item errors: an error wrapping ErrMalformed for input that is not a
// ciphertext; ErrDecrypt for every authentication failure and unknown key;
// an error wrapping ErrDerive if the key could not be derived; the
// Resolver's other errors. If ctx is done before work starts, every item
// reports ctx's error.
func (e *Engine) Open(ctx context.Context, resolve Resolver, items []Ciphertext) []Opened {
	res := make([]Opened, len(items))
	if err := ctx.Err(); err != nil {
		for i := range res {
			res[i].Err = err
		}
		return res
	}
	ps := make([]parsed, len(items))
	total := e.parseAll(items, ps, res)
	e.keysFor(ctx, resolve, ps, res)

	slab := make([]byte, total)
	off := 0
	for i := range ps {
		if res[i].Err == nil {
			res[i].Plaintext = slab[off : off : off+ps[i].size]
			off += ps[i].size
		}
	}
	e.parallel(len(items), total, func(lo, hi int) {
		aad := make([]byte, 0, 256)
		for i := lo; i < hi; i++ {
			if res[i].Err != nil {
				continue
			}
			p := &ps[i]
			aad = wire.AppendAAD(aad[:0], p.raw[:wire.HeaderSize], p.ref.Tenant, items[i].Context)
			pt, err := p.key.aead.Open(res[i].Plaintext, p.hdr.Nonce[:], p.raw[wire.HeaderSize:], aad)
			if err != nil {
				res[i] = Opened{Err: ErrDecrypt} // Open cleared its output
				continue
			}
			res[i].Plaintext = pt
		}
	})
	return res
}

// parseAll reads every item's header, recording malformed items in res, and
// returns the total plaintext size of the others.
func (e *Engine) parseAll(items []Ciphertext, ps []parsed, res []Opened) int {
	total := 0
	for i := range items {
		data := items[i].Data
		if wire.IsText(data) {
			var err error
			if data, err = wire.DecodeText(data); err != nil {
				res[i].Err = err
				continue
			}
		}
		h, body, err := wire.Parse(data)
		if err != nil {
			res[i].Err = err
			continue
		}
		ps[i] = parsed{raw: data, hdr: h, size: len(body) - wire.TagSize}
		total += ps[i].size
	}
	return total
}

// keysFor resolves and derives the key of every parsed item, once per
// (tenant, version) and once per (tenant, version, seed).
func (e *Engine) keysFor(ctx context.Context, resolve Resolver, ps []parsed, res []Opened) {
	type tv struct {
		tenantID uint64
		version  uint32
	}
	type resolved struct {
		ref *KeyRef
		err error
	}
	type group struct {
		key *dek
		err error
	}
	refs := map[tv]resolved{}
	keys := map[openKey]group{}
	var prev *parsed // the last item that got a key: batches are mostly one group
	for i := range ps {
		if res[i].Err != nil {
			continue
		}
		p := &ps[i]
		if prev != nil && p.hdr.TenantID == prev.hdr.TenantID && p.hdr.KeyVersion == prev.hdr.KeyVersion && p.hdr.Seed == prev.hdr.Seed {
			p.key, p.ref = prev.key, prev.ref
			continue
		}
		k := tv{p.hdr.TenantID, p.hdr.KeyVersion}
		r, ok := refs[k]
		if !ok {
			ref, err := resolve(ctx, k.tenantID, k.version)
			if errors.Is(err, ErrUnknownKey) {
				err = ErrDecrypt
			}
			r = resolved{&ref, err}
			refs[k] = r
		}
		if r.err != nil {
			res[i].Err = r.err
			continue
		}
		ok2 := openKey{*r.ref, p.hdr.Seed}
		g, ok := keys[ok2]
		if !ok {
			g.key, g.err = e.openingKey(ctx, r.ref, p.hdr.Seed)
			keys[ok2] = g
		}
		if g.err != nil {
			res[i].Err = g.err
			continue
		}
		p.key, p.ref = g.key, r.ref
		prev = p
	}
}
