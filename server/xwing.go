package server

import (
	"bytes"
	"context"
	"crypto/hpke"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
	"github.com/hsmd/hsmd/store"
)

// XWingAlgorithm names the HPKE ciphersuite of suite 0x02 in PublicKey.
const XWingAlgorithm = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"

// Wrapper seals the few secrets kept outside the HSM under its wrap key
// (hsm.HSM.WrapSeal/WrapOpen: AES-256-GCM, non-empty AAD).
type Wrapper interface {
	WrapSeal(ctx context.Context, plaintext, aad []byte) ([]byte, error)
	WrapOpen(ctx context.Context, sealed, aad []byte) ([]byte, error)
}

// XWingKeys keeps the X-Wing key pairs of tenant key versions: the public
// key in the store, the private key (its 32-byte seed) in the store sealed
// by Wrap under an AAD naming the tenant id and version
// (wire.AppendXWingKeyAAD). It implements envelope.XWingKeys (give it to
// envelope.Config.XWing, which caches the opened keys) and serves
// Keys.GetPublicKey (Config.XWing). Safe for concurrent use.
type XWingKeys struct {
	Store store.Store
	Wrap  Wrapper
}

// errNoXWing: the server was configured without XWingKeys.
var errNoXWing = status.Error(codes.Unimplemented, "X-Wing public keys are not configured")

// XWingKey opens the X-Wing private key of ref's version. It returns an
// error wrapping envelope.ErrUnknownKey if the tenant or version is gone,
// has other key material than ref, or has no key pair; an error if the
// sealed key does not open or does not match the public key.
func (x *XWingKeys) XWingKey(ctx context.Context, ref envelope.KeyRef) (hpke.PrivateKey, error) {
	t, err := x.Store.GetTenantByID(ctx, ref.TenantID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, envelope.ErrUnknownKey
	}
	if err != nil {
		return nil, err
	}
	kv, ok := t.Version(ref.Version)
	if !ok || t.Name != ref.Tenant || !bytes.Equal(kv.Salt, ref.Salt[:]) || kv.XWingSealed == nil {
		return nil, envelope.ErrUnknownKey
	}
	seed, err := x.Wrap.WrapOpen(ctx, kv.XWingSealed, wire.AppendXWingKeyAAD(nil, t.ID, kv.Version))
	if err != nil {
		return nil, fmt.Errorf("server: open the X-Wing key of tenant %q version %d: %w", t.Name, kv.Version, err)
	}
	defer clear(seed)
	kem, _, _ := envelope.XWingSuite()
	priv, err := kem.NewPrivateKey(seed)
	if err != nil {
		return nil, fmt.Errorf("server: the X-Wing key of tenant %q version %d is invalid", t.Name, kv.Version)
	}
	if !bytes.Equal(priv.PublicKey().Bytes(), kv.XWingPublic) {
		return nil, fmt.Errorf("server: the X-Wing key of tenant %q version %d does not match its public key", t.Name, kv.Version)
	}
	return priv, nil
}

// PublicKey returns the tenant named name and its current version, with
// the version's X-Wing public key, making the key pair first if the
// version has none: the private key is sealed by Wrap and the tenant
// record updated (compare-and-swap; on a conflict it re-reads and keeps
// whichever pair was written first). Errors: store.ErrNotFound, the
// Wrapper's, the store's.
func (x *XWingKeys) PublicKey(ctx context.Context, name string) (*store.Tenant, store.KeyVersion, error) {
	for attempt := 0; ; attempt++ {
		t, err := x.Store.GetTenant(ctx, name)
		if err != nil {
			return nil, store.KeyVersion{}, err
		}
		i := versionIndex(t, t.Current)
		if i < 0 {
			return nil, store.KeyVersion{}, fmt.Errorf("server: tenant %q has no current version %d", name, t.Current)
		}
		kv := &t.Versions[i]
		if kv.XWingPublic != nil {
			return t, *kv, nil
		}
		if err := x.newPair(ctx, t.ID, kv); err != nil {
			return nil, store.KeyVersion{}, err
		}
		err = x.Store.UpdateTenant(ctx, t)
		if err == nil {
			return t, *kv, nil
		}
		if !errors.Is(err, store.ErrConflict) || attempt >= 10 {
			return nil, store.KeyVersion{}, err
		}
	}
}

// newPair makes an X-Wing key pair for version kv of tenant id and puts
// its public key and sealed private key in kv.
func (x *XWingKeys) newPair(ctx context.Context, tenantID uint64, kv *store.KeyVersion) error {
	kem, _, _ := envelope.XWingSuite()
	priv, err := kem.GenerateKey()
	if err != nil {
		return fmt.Errorf("server: new X-Wing key: %w", err)
	}
	seed, err := priv.Bytes()
	if err != nil {
		return fmt.Errorf("server: new X-Wing key: %w", err)
	}
	defer clear(seed)
	sealed, err := x.Wrap.WrapSeal(ctx, seed, wire.AppendXWingKeyAAD(nil, tenantID, kv.Version))
	if err != nil {
		return fmt.Errorf("server: seal the new X-Wing key under the HSM wrap key: %w", err)
	}
	kv.XWingPublic, kv.XWingSealed = priv.PublicKey().Bytes(), sealed
	return nil
}

func versionIndex(t *store.Tenant, v uint32) int {
	for i := range t.Versions {
		if t.Versions[i].Version == v {
			return i
		}
	}
	return -1
}

// GetPublicKey returns the X-Wing public key of the tenant's current
// version, making the pair on first use.
func (k *keysService) GetPublicKey(ctx context.Context, req *hsmdv1.GetPublicKeyRequest) (*hsmdv1.PublicKey, error) {
	x := k.s.cfg.XWing
	if x == nil {
		return nil, errNoXWing
	}
	if _, err := k.s.tenant(ctx, req.Tenant); err != nil {
		return nil, err
	}
	t, kv, err := x.PublicKey(ctx, req.Tenant)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: tenant %q", errNotFound, req.Tenant)
	}
	if err != nil {
		return nil, err
	}
	return &hsmdv1.PublicKey{Tenant: t.Name, TenantId: t.ID, KeyVersion: kv.Version, Algorithm: XWingAlgorithm, PublicKey: kv.XWingPublic}, nil
}
