package envelope

import "context"

// Deriver computes the pseudorandom function from which data keys are
// derived: HMAC-SHA256 under the root key (kdk) of the given version, which
// never leaves the HSM. The hsm package implements it; tests may wrap it.
//
// PRF must be safe for concurrent use and must honour ctx's deadline. It
// returns 32 bytes.
type Deriver interface {
	PRF(ctx context.Context, kdkVersion uint32, msg []byte) ([]byte, error)
}
