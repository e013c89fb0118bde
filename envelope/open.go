package envelope

import (
	"context"
	"crypto/hpke"
	"errors"
	"fmt"
	"sync/atomic"

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
	raw   []byte // binary ciphertext
	hdr   wire.Header
	group int // index into the batch's groups
	size  int // plaintext size
}

// group is the items of one batch that share a data key.
type group struct {
	tenantID uint64
	version  uint32
	seed     [wire.SeedSize]byte
	suite    byte
	ref      *KeyRef
	key      *dek
	priv     hpke.PrivateKey // suite 0x02
	err      error
	fresh    bool        // derived by this call, not yet cached
	opened   atomic.Bool // at least one item authenticated
}

// Open decrypts every item and reports each on its own, in order: one bad
// item does not fail the others. Items are grouped by (tenant, version,
// seed), and each group costs at most one Deriver call (none if its key is
// cached). A derived key is cached only once an item has authenticated
// under it, so forged items cannot flush the cache. The plaintexts share
// one allocation.
//
// Open fails as a whole, before any Deriver call, only if the batch spans
// more than Config.MaxGroups groups (an error wrapping ErrTooManyGroups).
// Per-item errors: an error wrapping ErrMalformed for input that is not a
// ciphertext; ErrDecrypt for every authentication failure and unknown key;
// an error wrapping ErrDerive if the key could not be derived; the
// Resolver's other errors; ctx's error if ctx is done before work starts.
func (e *Engine) Open(ctx context.Context, resolve Resolver, items []Ciphertext) ([]Opened, error) {
	return e.open(ctx, resolve, items, false)
}

// OpenInPlace is Open with each plaintext written over its own ciphertext
// instead of into a new allocation: it overwrites the items' Data (those
// that fail included), for callers that own them and need them no more,
// such as a server answering the request they came in.
func (e *Engine) OpenInPlace(ctx context.Context, resolve Resolver, items []Ciphertext) ([]Opened, error) {
	return e.open(ctx, resolve, items, true)
}

func (e *Engine) open(ctx context.Context, resolve Resolver, items []Ciphertext, inPlace bool) ([]Opened, error) {
	res := make([]Opened, len(items))
	if err := ctx.Err(); err != nil {
		for i := range res {
			res[i].Err = err
		}
		return res, nil
	}
	ps := make([]parsed, len(items))
	groups, total := parseAll(items, ps, res)
	if len(groups) > e.cfg.MaxGroups {
		return nil, fmt.Errorf("%w: the batch spans %d data keys, the limit is %d", ErrTooManyGroups, len(groups), e.cfg.MaxGroups)
	}
	e.keysFor(ctx, resolve, groups)

	weight := total
	for i := range ps {
		if res[i].Err == nil && ps[i].hdr.Suite == wire.SuiteXWing {
			weight += xwingWeight
		}
	}
	var slab []byte
	if !inPlace {
		slab = make([]byte, total)
	}
	off := 0
	for i := range ps {
		if res[i].Err == nil {
			if res[i].Err = groups[ps[i].group].err; res[i].Err == nil {
				switch {
				case !inPlace:
					res[i].Plaintext = slab[off : off : off+ps[i].size]
					off += ps[i].size
				case ps[i].hdr.Suite == wire.SuiteAES256GCM:
					// AES-GCM decrypts in place when the output starts
					// where the input does: the body after the header.
					res[i].Plaintext = ps[i].raw[wire.HeaderSize : wire.HeaderSize : wire.HeaderSize+ps[i].size]
				}
			}
		}
	}
	e.parallel(len(items), weight, func(lo, hi int) {
		var aadBuf [256]byte
		for i := lo; i < hi; i++ {
			if res[i].Err != nil {
				continue
			}
			p, g := &ps[i], groups[ps[i].group]
			if p.hdr.Suite == wire.SuiteXWing {
				e.openXWingItem(&res[i], p, g, items[i].Context)
				continue
			}
			aad := wire.AppendAAD(aadBuf[:0], p.raw[:wire.HeaderSize], g.ref.Tenant, items[i].Context)
			pt, err := g.key.aead.Open(res[i].Plaintext, p.hdr.Nonce[:], p.raw[wire.HeaderSize:], aad)
			if err != nil {
				res[i] = Opened{Err: ErrDecrypt} // Open cleared its output
				continue
			}
			res[i].Plaintext = pt
			g.opened.Store(true)
		}
	})
	for _, g := range groups {
		if g.fresh && g.opened.Load() {
			e.openKeys.Add(openKey{*g.ref, g.seed}, g.key)
		}
	}
	return res, nil
}

// parseAll reads every item's header, recording malformed items in res,
// assigns each other item its group, and returns the groups and the total
// plaintext size.
func parseAll(items []Ciphertext, ps []parsed, res []Opened) ([]*group, int) {
	type gk struct {
		tenantID uint64
		version  uint32
		seed     [wire.SeedSize]byte
		suite    byte
	}
	index := map[gk]int{}
	var groups []*group
	total, prev := 0, -1 // prev: the last parsed item; batches are mostly one group
	for i := range items {
		data := items[i].Data
		if wire.IsText(data) {
			var err error
			if data, err = wire.DecodeText(data); err != nil {
				res[i].Err = err
				continue
			}
		}
		h, body, err := parseItem(data)
		if err != nil {
			res[i].Err = err
			continue
		}
		p := &ps[i]
		*p = parsed{raw: data, hdr: h, size: len(body) - wire.TagSize}
		total += p.size
		if prev >= 0 && h.TenantID == ps[prev].hdr.TenantID && h.KeyVersion == ps[prev].hdr.KeyVersion && h.Seed == ps[prev].hdr.Seed && h.Suite == ps[prev].hdr.Suite {
			p.group, prev = ps[prev].group, i
			continue
		}
		k := gk{h.TenantID, h.KeyVersion, h.Seed, h.Suite}
		gi, ok := index[k]
		if !ok {
			gi = len(groups)
			index[k] = gi
			groups = append(groups, &group{tenantID: k.tenantID, version: k.version, seed: k.seed, suite: k.suite})
		}
		p.group, prev = gi, i
	}
	return groups, total
}

// keysFor resolves each group's key version (once per tenant and version)
// and finds its data key in the cache or derives it.
func (e *Engine) keysFor(ctx context.Context, resolve Resolver, groups []*group) {
	type tv struct {
		tenantID uint64
		version  uint32
	}
	type resolved struct {
		ref *KeyRef
		err error
	}
	refs := map[tv]resolved{}
	for _, g := range groups {
		k := tv{g.tenantID, g.version}
		r, ok := refs[k]
		if !ok {
			ref, err := resolve(ctx, k.tenantID, k.version)
			if errors.Is(err, ErrUnknownKey) {
				err = ErrDecrypt
			}
			r = resolved{&ref, err}
			refs[k] = r
		}
		if g.ref, g.err = r.ref, r.err; g.err != nil {
			continue
		}
		if g.suite == wire.SuiteXWing {
			g.priv, g.err = e.xwingKey(ctx, g.ref)
			continue
		}
		g.key, g.fresh, g.err = e.openingKey(ctx, g.ref, g.seed)
	}
}
