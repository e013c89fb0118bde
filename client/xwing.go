package client

import (
	"context"
	"crypto/hpke"
	"fmt"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
)

// PublicKey is the X-Wing (MLKEM768-X25519) public key of one tenant key
// version. With it a producer seals records offline, with no call to hsmd
// ([PublicKey.Seal]); hsmd's Decrypt opens them like any other ciphertext
// (docs/FORMAT.md, suite 0x02). It holds no secret and is safe for
// concurrent use. When the tenant's key rotates, fetch the new one: records
// sealed to an older version open while that version is enabled.
type PublicKey struct {
	Tenant   string
	TenantID uint64
	Version  uint32
	// Key is the X-Wing public key, 1216 bytes.
	Key []byte
	pk  hpke.PublicKey
}

// NewPublicKey returns the PublicKey of version version of the tenant
// (tenant, tenantID) from its X-Wing public key bytes, for producers that
// store the key and never dial hsmd. An invalid key is an "hsmd client: "
// error.
func NewPublicKey(tenant string, tenantID uint64, version uint32, key []byte) (*PublicKey, error) {
	kem, _, _ := envelope.XWingSuite()
	pk, err := kem.NewPublicKey(key)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: not an X-Wing public key: %w", err)
	}
	if tenant == "" || tenantID == 0 || version == 0 {
		return nil, fmt.Errorf("hsmd client: a public key needs a tenant name, id and version")
	}
	return &PublicKey{Tenant: tenant, TenantID: tenantID, Version: version, Key: pk.Bytes(), pk: pk}, nil
}

// PublicKey returns the X-Wing public key of the tenant's current key
// version; the server makes the key pair on first request. Errors are
// gRPC status errors (codes.NotFound for an unknown tenant,
// codes.Unimplemented if the server has no X-Wing keys), or an "hsmd
// client: " error for a malformed response.
func (c *Client) PublicKey(ctx context.Context, tenant string) (*PublicKey, error) {
	resp, err := c.keys.GetPublicKey(ctx, &hsmdv1.GetPublicKeyRequest{Tenant: tenant})
	if err != nil {
		return nil, err
	}
	return NewPublicKey(resp.Tenant, resp.TenantId, resp.KeyVersion, resp.PublicKey)
}

// Seal encrypts plaintext offline to the key version, binding the tenant,
// the version and context (which opening needs again), and returns a
// binary suite 0x02 ciphertext (1150 bytes of overhead). Each call costs
// an X-Wing encapsulation. Errors: a plaintext over the format's maximum.
func (p *PublicKey) Seal(plaintext []byte, context map[string]string) ([]byte, error) {
	ct, err := envelope.SealXWing(p.pk, p.Tenant, p.TenantID, p.Version, plaintext, context)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: %w", err)
	}
	return ct, nil
}
