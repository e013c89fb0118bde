package envelope

import (
	"crypto/rand"
	"encoding/binary"
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

// worker returns the generator one worker uses.
func (ns nonces) worker() nonceGen {
	if ns.buf != nil {
		return nonceGen{buf: ns.buf}
	}
	var key [32]byte
	rand.Read(key[:]) // panics if the OS source fails, as crypto/rand does
	g := nonceGen{s: mrand.NewChaCha8(key)}
	clear(key[:])
	return g
}

// nonceGen fills the nonces of one worker's items.
type nonceGen struct {
	buf []byte
	s   *mrand.ChaCha8
}

// fill writes item i's 12-byte nonce into dst.
func (g nonceGen) fill(i int, dst []byte) {
	if g.buf != nil {
		copy(dst, g.buf[i*wire.NonceSize:])
		return
	}
	// Two words rather than Read, which buffers partial words: 12 of the 16
	// bytes are used.
	binary.LittleEndian.PutUint64(dst[:8], g.s.Uint64())
	binary.LittleEndian.PutUint32(dst[8:12], uint32(g.s.Uint64()))
}
