// Package bufpool is the buffer pool hsmd's gRPC servers and clients give
// gRPC (experimental.BufferPool, experimental.WithBufferPool) in place of
// its default, which clears every buffer it hands out: gRPC reads or
// writes a buffer's whole length before anything reads it, so the clearing
// only costs (about 6% of the CPU of a batch of 1,000 1 KiB items, client
// and server together). Buffers are kept in power-of-two classes from
// 256 B to 128 MiB (a batch at the server's default 64 MiB request limit,
// and its response); larger ones are not pooled. sync.Pool drops what
// two garbage collections find unused, so idle buffers do not stay.
package bufpool

import (
	"math/bits"
	"sync"

	"google.golang.org/grpc/mem"
)

const (
	minShift = 8
	maxShift = 27
)

// Pool is a mem.BufferPool that does not clear buffers.
type Pool struct {
	classes [maxShift - minShift + 1]sync.Pool
}

var _ mem.BufferPool = (*Pool)(nil)

// Shared is the process's pool.
var Shared = new(Pool)

func class(n int) int {
	if n <= 1<<minShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minShift
}

// Get returns a buffer of length n. Its contents are whatever it held
// before: the caller writes all of it before reading any.
func (p *Pool) Get(n int) *[]byte {
	c := class(n)
	if c >= len(p.classes) {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minShift))
	return &b
}

// Put returns a buffer to the pool.
func (p *Pool) Put(b *[]byte) {
	c := cap(*b)
	if c < 1<<minShift || c&(c-1) != 0 {
		return // not one of ours (or not a class size)
	}
	i := bits.Len(uint(c)) - 1 - minShift
	if i >= len(p.classes) {
		return
	}
	p.classes[i].Put(b)
}
