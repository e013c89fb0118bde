package tpm

import (
	"fmt"
	"io"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"
)

// loadSRK returns the ECC storage root key of the owner hierarchy (template
// client.SRKTemplateECC, a primary key: the same key each time for the same
// TPM and owner seed) and a function that releases it.
//
// If the TPM holds a persistent key matching that template at the TCG's
// reserved ECC SRK handle 0x81000002, it is used as is (faster: no
// TPM2_CreatePrimary). Otherwise a transient primary key is created and the
// release function flushes it. Unlike client.StorageRootKeyECC, loadSRK never
// makes the key persistent and never evicts what another program keeps at
// 0x81000002; either way blobs are sealed to the same key.
func loadSRK(rw io.ReadWriter) (*client.Key, func(), error) {
	tmpl := client.SRKTemplateECC()
	pub, _, _, err := tpm2.ReadPublic(rw, client.SRKECCReservedHandle)
	if err == nil && pub.MatchesTemplate(tmpl) {
		k, err := client.LoadCachedKey(rw, client.SRKECCReservedHandle, client.NullSession{})
		if err != nil {
			return nil, nil, fmt.Errorf("loading the persistent storage root key: %w", err)
		}
		return k, func() {}, nil // persistent: nothing to flush
	}
	k, err := client.NewKey(rw, tpm2.HandleOwner, tmpl)
	if err != nil {
		return nil, nil, fmt.Errorf("creating the storage root key: %w", err)
	}
	return k, k.Close, nil
}
