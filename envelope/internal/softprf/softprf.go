// Package softprf is a software Deriver for the envelope's own unit tests
// and for generating test vectors: HMAC-SHA256 under known keys, with a
// call counter and an injectable failure. It is not a substitute for the
// HSM: the server's tests run against a real SoftHSM token.
package softprf

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// PRF computes HMAC-SHA256 with one key per kdk version.
type PRF struct {
	keys  map[uint32][]byte
	calls atomic.Int64
	mu    sync.Mutex
	fail  error
}

// New returns a PRF with the given kdk versions and keys.
func New(keys map[uint32][]byte) *PRF { return &PRF{keys: keys} }

// ErrUnknownVersion is returned for a kdk version that has no key.
var ErrUnknownVersion = errors.New("softprf: unknown kdk version")

// PRF implements envelope.Deriver.
func (p *PRF) PRF(ctx context.Context, kdkVersion uint32, msg []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.Lock()
	fail := p.fail
	p.mu.Unlock()
	if fail != nil {
		return nil, fail
	}
	k, ok := p.keys[kdkVersion]
	if !ok {
		return nil, fmt.Errorf("%w %d", ErrUnknownVersion, kdkVersion)
	}
	p.calls.Add(1)
	m := hmac.New(sha256.New, k)
	m.Write(msg)
	return m.Sum(nil), nil
}

// Calls returns the number of successful PRF calls.
func (p *PRF) Calls() int64 { return p.calls.Load() }

// FailWith makes every later call fail with err (nil restores service).
func (p *PRF) FailWith(err error) {
	p.mu.Lock()
	p.fail = err
	p.mu.Unlock()
}
