package envelope

import (
	"context"
	"crypto/hpke"
	"errors"
	"fmt"
	"time"

	"github.com/hsmd/hsmd/envelope/wire"
)

// XWingKeys gives the X-Wing private key of a tenant key version, to open
// suite 0x02 items (docs/FORMAT.md). The server implements it by opening
// the version's private key under the HSM wrap key; the Engine caches what
// it returns. XWingKey returns an error wrapping ErrUnknownKey if the
// version has no X-Wing key pair. It must be safe for concurrent use and
// honour ctx.
type XWingKeys interface {
	XWingKey(ctx context.Context, ref KeyRef) (hpke.PrivateKey, error)
}

// XWingSuite returns the HPKE ciphersuite of suite 0x02: MLKEM768-X25519
// (X-Wing), HKDF-SHA256, AES-256-GCM.
func XWingSuite() (hpke.KEM, hpke.KDF, hpke.AEAD) {
	return hpke.MLKEM768X25519(), hpke.HKDFSHA256(), hpke.AES256GCM()
}

// SealXWing seals one record offline, with no call to hsmd, to pub, the
// X-Wing public key of version keyVersion of the tenant (tenant, tenantID),
// as a suite 0x02 ciphertext: the tenant, id and version are bound in the
// HPKE info and the AAD, context in the AAD. Each call draws a fresh
// encapsulation from crypto/rand. Safe for concurrent use.
//
// Errors: a tenant name of the wrong size, a zero id or version, a public
// key of another KEM, a plaintext over MaxItemSize.
func SealXWing(pub hpke.PublicKey, tenant string, tenantID uint64, keyVersion uint32, plaintext []byte, context map[string]string) ([]byte, error) {
	kem, kdf, aead := XWingSuite()
	switch {
	case len(tenant) == 0 || len(tenant) > wire.MaxTenantLen:
		return nil, fmt.Errorf("envelope: tenant name of %d bytes, want 1 to %d", len(tenant), wire.MaxTenantLen)
	case tenantID == 0 || keyVersion == 0:
		return nil, errors.New("envelope: tenant id and key version must not be zero")
	case pub == nil || pub.KEM().ID() != kem.ID():
		return nil, errors.New("envelope: not an X-Wing (MLKEM768-X25519) public key")
	case len(plaintext) > MaxItemSize:
		return nil, fmt.Errorf("envelope: item is %d bytes, the format's maximum is %d", len(plaintext), MaxItemSize)
	}
	var infoBuf [128]byte
	info := wire.AppendXWingInfo(infoBuf[:0], tenant, tenantID, keyVersion)
	enc, s, err := hpke.NewSender(pub, kdf, aead, info)
	if err != nil {
		return nil, fmt.Errorf("envelope: hpke: %w", err)
	}
	if len(enc) != wire.XWingEncSize {
		return nil, fmt.Errorf("envelope: hpke: encapsulation of %d bytes, want %d", len(enc), wire.XWingEncSize)
	}
	out := make([]byte, wire.XWingHeaderSize, wire.XWingOverhead+len(plaintext))
	wire.PutXWingPrefix(out, tenantID, keyVersion)
	copy(out[wire.XWingPrefixSize:], enc)
	var aadBuf [256]byte
	aad := wire.AppendXWingAAD(aadBuf[:0], out, tenant, context)
	ct, err := s.Seal(aad, plaintext)
	if err != nil {
		return nil, fmt.Errorf("envelope: hpke: %w", err)
	}
	return append(out, ct...), nil
}

// OpenXWing opens one suite 0x02 binary ciphertext with the private key of
// its tenant key version, outside an Engine (for tools and tests): the
// tenant id and key version in ct are not checked against priv, they are
// bound by the HPKE info. It returns an error wrapping ErrMalformed, or
// ErrDecrypt.
func OpenXWing(priv hpke.PrivateKey, tenant string, ct []byte, context map[string]string) ([]byte, error) {
	h, enc, body, err := wire.ParseXWing(ct)
	if err != nil {
		return nil, err
	}
	return openXWing(priv, tenant, &h, ct, enc, body, context)
}

func openXWing(priv hpke.PrivateKey, tenant string, h *wire.Header, raw, enc, body []byte, context map[string]string) ([]byte, error) {
	_, kdf, aead := XWingSuite()
	var infoBuf [128]byte
	info := wire.AppendXWingInfo(infoBuf[:0], tenant, h.TenantID, h.KeyVersion)
	r, err := hpke.NewRecipient(enc, priv, kdf, aead, info)
	if err != nil {
		return nil, ErrDecrypt
	}
	var aadBuf [256]byte
	pt, err := r.Open(wire.AppendXWingAAD(aadBuf[:0], raw, tenant, context), body)
	if err != nil {
		return nil, ErrDecrypt
	}
	return pt, nil
}

// xwingEntry is a cached X-Wing private key.
type xwingEntry struct {
	key  hpke.PrivateKey
	born time.Time
}

// xwingKey returns the X-Wing private key of ref from the cache, or asks
// Config.XWing (and caches it). A cached key is used until it is older
// than Limits.MaxAge or Forget drops it.
func (e *Engine) xwingKey(ctx context.Context, ref *KeyRef) (hpke.PrivateKey, error) {
	if e.cfg.XWing == nil {
		return nil, ErrDecrypt
	}
	if x, ok := e.xwingKeys.Get(*ref); ok && e.cfg.Now().Sub(x.born) < e.cfg.Limits.MaxAge {
		e.stats.xwingHits.Add(1)
		return x.key, nil
	}
	k, err := e.cfg.XWing.XWingKey(ctx, *ref)
	switch {
	case errors.Is(err, ErrUnknownKey):
		return nil, ErrDecrypt
	case err != nil:
		e.stats.deriveErrors.Add(1)
		return nil, fmt.Errorf("%w: %w", ErrDerive, err)
	case k == nil || k.KEM().ID() != hpke.MLKEM768X25519().ID():
		return nil, fmt.Errorf("%w: not an X-Wing private key", ErrDerive)
	}
	e.stats.xwingMisses.Add(1)
	e.xwingKeys.Add(*ref, &xwingEntry{key: k, born: e.cfg.Now()})
	return k, nil
}

// parseItem reads the header of a binary ciphertext of any suite.
func parseItem(data []byte) (wire.Header, []byte, error) {
	if wire.IsXWing(data) {
		h, _, body, err := wire.ParseXWing(data)
		return h, body, err
	}
	return wire.Parse(data)
}

// xwingWeight is what one suite 0x02 item counts, in plaintext bytes, when
// Open decides whether to split a batch across workers: its cost is the
// decapsulation, whatever its size.
const xwingWeight = 64 << 10

// openXWingItem opens suite 0x02 item p of group g into r.Plaintext (its
// place in the batch's slab), or sets r to ErrDecrypt.
func (e *Engine) openXWingItem(r *Opened, p *parsed, g *group, context map[string]string) {
	enc := p.raw[wire.XWingPrefixSize:wire.XWingHeaderSize]
	pt, err := openXWing(g.priv, g.ref.Tenant, &p.hdr, p.raw, enc, p.raw[wire.XWingHeaderSize:], context)
	if err != nil {
		*r = Opened{Err: ErrDecrypt}
		return
	}
	r.Plaintext = append(r.Plaintext, pt...)
	clear(pt)
	g.opened.Store(true)
}
