package main

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/hsmd/hsmd/client"
)

// printPublicKey prints the X-Wing public key of the tenant's current
// version (hsmd keys public T): tenant, id, version and algorithm, then the
// key in unpadded base64url.
func printPublicKey(ctx context.Context, w io.Writer, c *client.Client, tenant string) error {
	pk, err := c.PublicKey(ctx, tenant)
	if err != nil {
		return clientRPCError(keysOps["public"].what, err)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "tenant:\t%s\n", pk.Tenant)
	fmt.Fprintf(tw, "tenant id:\t%d\n", pk.TenantID)
	fmt.Fprintf(tw, "key version:\t%d\n", pk.Version)
	fmt.Fprintf(tw, "algorithm:\t%s\n", "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM")
	fmt.Fprintf(tw, "public key:\t%s\n", base64.RawURLEncoding.EncodeToString(pk.Key))
	return tw.Flush()
}
