package client

import (
	"context"
	"fmt"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// RewrapResult is the outcome of rewrapping one item: Ciphertext when Err
// is nil.
type RewrapResult struct {
	// Ciphertext is a binary ciphertext under the tenant's current key
	// version, with the item's context.
	Ciphertext []byte
	// Err is as for [Result.Err]: ErrDecrypt, or an *ItemError wrapping
	// ErrMalformed, ErrKeyDisabled, ErrKeyDestroyed, ErrKeyRetired or
	// nothing.
	Err error
}

// Rewrap re-encrypts items under the tenant's current key version in one
// RPC, each with its own context: the plaintexts never leave the server.
// An item already under the current version comes back unchanged (in
// binary form). It returns one result per item, in order (one bad item
// does not fail the others), and the version the items are now under.
// tenant is required, and items of other tenants fail with ErrDecrypt.
// The returned error is non-nil only when the whole call failed (a gRPC
// status error, or a malformed response).
//
// Rewrap after [Client.RotateKey] moves data off old versions, before
// raising [Policy.MinDecryptionVersion] or destroying them.
func (c *Client) Rewrap(ctx context.Context, tenant string, items []CiphertextItem) ([]RewrapResult, uint32, error) {
	req := &hsmdv1.RewrapRequest{Tenant: tenant, Items: make([]*hsmdv1.DecryptItem, len(items))}
	for i, it := range items {
		req.Items[i] = &hsmdv1.DecryptItem{Ciphertext: it.Ciphertext, Context: it.Context}
	}
	resp, err := c.env.Rewrap(ctx, req)
	if err != nil {
		return nil, 0, err
	}
	if n := len(resp.GetResults()); n != len(items) {
		return nil, 0, fmt.Errorf("hsmd client: server returned %d results for %d items", n, len(items))
	}
	out := make([]RewrapResult, len(items))
	for i, r := range resp.GetResults() {
		if r.GetError() != nil {
			out[i].Err = itemErr(r.GetError())
			continue
		}
		if len(r.GetCiphertext()) == 0 {
			return nil, 0, fmt.Errorf("hsmd client: server returned an empty ciphertext for item %d", i)
		}
		out[i].Ciphertext = r.GetCiphertext()
	}
	return out, resp.GetKeyVersion(), nil
}
