package envelope

import (
	"crypto/rand"
	"fmt"
	"io"
	mrand "math/rand/v2"

	"github.com/hsmd/hsmd/envelope/wire"
)

// streamMinItems is the batch size from which nonces come from ChaCha8
// streams rather than one crypto/rand read per batch.
const streamMinItems = 64

// nonces hands out the random 96-bit nonces of one batch.
//
// A small batch, or an Engine with Config.Rand set, reads all its nonces
// from the random source at once. A large batch gives each worker its own
// ChaCha8 stream (math/rand/v2, a cryptographically strong generator) keyed
// with 256 bits from crypto/rand, and writes nonces straight into the
// headers: a third of the cost of crypto/rand on this path, and no buffer.
// Either way every nonce is uniformly random, as docs/FORMAT.md requires.
type nonces struct {
	buf []byte // drawn up front, or nil for streams
}

func (e *Engine) nonceSource(n int) (nonces, error) {
	if e.cfg.Rand == nil && n >= streamMinItems {
		return nonces{}, nil
	}
	buf := make([]byte, n*wire.NonceSize)
	if _, err := io.ReadFull(e.rand, buf); err != nil {
		return nonces{}, fmt.Errorf("envelope: draw nonces: %w", err)
	}
	return nonces{buf: buf}, nil
}

// worker returns the function one worker uses to fill item i's nonce. It
// panics if crypto/rand fails, as crypto/rand.Read itself does.
func (ns nonces) worker() func(i int, dst []byte) {
	if ns.buf != nil {
		return func(i int, dst []byte) { copy(dst, ns.buf[i*wire.NonceSize:]) }
	}
	var key [32]byte
	rand.Read(key[:])
	s := mrand.NewChaCha8(key)
	clear(key[:])
	return func(_ int, dst []byte) { s.Read(dst) }
}
