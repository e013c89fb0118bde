package server

import (
	"encoding/base64"
	"fmt"
	"math"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope/wire"
)

// Default limits. Every size a caller controls is capped before the server
// allocates for it: the transport refuses a message over
// MaxRequestBytes+TransportHeadroom before reading it (RESOURCE_EXHAUSTED),
// and the handlers check the rest before any work (INVALID_ARGUMENT naming
// the limit).
const (
	DefaultMaxBatchItems   = 10_000
	DefaultMaxItemBytes    = 4 << 20  // plaintext or ciphertext of one item
	DefaultMaxRequestBytes = 64 << 20 // all items' payload and context bytes
	DefaultMaxContextBytes = 4 << 10  // one item's context, encoded
	// TransportHeadroom is what the gRPC message may carry beyond
	// MaxRequestBytes of payload: protobuf framing of up to
	// DefaultMaxBatchItems items and their contexts.
	TransportHeadroom = 1 << 20
	// DefaultMaxConcurrentPerIdentity is the default
	// limits.max_concurrent_per_identity.
	DefaultMaxConcurrentPerIdentity = 64
)

// Limits bound what one request may ask. The zero value of a field means
// its default.
type Limits struct {
	MaxBatchItems   int `yaml:"max_batch_items"`
	MaxItemBytes    int `yaml:"max_item_bytes"`
	MaxRequestBytes int `yaml:"max_request_bytes"`
	MaxContextBytes int `yaml:"max_context_bytes"`
	// MaxConcurrentPerIdentity bounds the calls one caller (see
	// limitIdentity) may have in flight; default
	// DefaultMaxConcurrentPerIdentity.
	MaxConcurrentPerIdentity int `yaml:"max_concurrent_per_identity"`
	// RatePerIdentity is the calls per second one caller may make on
	// average, in bursts of up to BurstPerIdentity (default twice the
	// rate); 0: no rate limit. Health probes are exempt from both.
	RatePerIdentity  float64 `yaml:"rate_per_identity"`
	BurstPerIdentity int     `yaml:"burst_per_identity"`
}

// WithDefaults returns l with zero fields set to their defaults.
func (l Limits) WithDefaults() Limits {
	def := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	def(&l.MaxBatchItems, DefaultMaxBatchItems)
	def(&l.MaxItemBytes, DefaultMaxItemBytes)
	def(&l.MaxRequestBytes, DefaultMaxRequestBytes)
	def(&l.MaxContextBytes, DefaultMaxContextBytes)
	def(&l.MaxConcurrentPerIdentity, DefaultMaxConcurrentPerIdentity)
	if l.RatePerIdentity > 0 && l.BurstPerIdentity == 0 {
		l.BurstPerIdentity = burstDefault(l.RatePerIdentity)
	}
	return l
}

// Validate returns an error naming the first bad field by its YAML path
// (limits.max_item_bytes …), or nil. Zero fields are valid: they mean the
// default.
func (l Limits) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"max_batch_items", l.MaxBatchItems}, {"max_item_bytes", l.MaxItemBytes}, {"max_request_bytes", l.MaxRequestBytes}, {"max_context_bytes", l.MaxContextBytes},
		{"max_concurrent_per_identity", l.MaxConcurrentPerIdentity}, {"burst_per_identity", l.BurstPerIdentity}} {
		if f.v < 0 {
			return fmt.Errorf("limits.%s must not be negative", f.name)
		}
	}
	if r := l.RatePerIdentity; r < 0 || math.IsNaN(r) || math.IsInf(r, 0) {
		return fmt.Errorf("limits.rate_per_identity must be a non-negative number of calls per second (0: no rate limit)")
	}
	if l.BurstPerIdentity != 0 && l.RatePerIdentity == 0 {
		return fmt.Errorf("limits.burst_per_identity needs limits.rate_per_identity")
	}
	if l.MaxItemBytes > 1<<30 {
		return fmt.Errorf("limits.max_item_bytes must be at most %d", 1<<30)
	}
	return nil
}

// MaxMessageBytes is the largest gRPC message the transport accepts.
func (l Limits) MaxMessageBytes() int { return l.MaxRequestBytes + TransportHeadroom }

// limitError is an over-limit request; it maps to INVALID_ARGUMENT.
type limitError struct {
	limit    string
	got, max int
	what     string
}

func (e *limitError) Error() string {
	return fmt.Sprintf("%s is %d, over the limit %s = %d", e.what, e.got, e.limit, e.max)
}

func (l *Limits) checkBatch(n int) error {
	if n == 0 {
		return &limitError{what: "the number of items", limit: "min_batch_items", got: 0, max: 1}
	}
	if n > l.MaxBatchItems {
		return &limitError{what: "the number of items", limit: "max_batch_items", got: n, max: l.MaxBatchItems}
	}
	return nil
}

// maxCiphertext is the largest ciphertext of a MaxItemBytes plaintext, in
// binary or (with whitespace around it) text form.
func (l *Limits) maxCiphertext(text bool) int {
	n := l.MaxItemBytes + wire.Overhead
	if text {
		n = len(wire.TextPrefix) + base64.RawURLEncoding.EncodedLen(n) + 16
	}
	return n
}

// checkItem checks one item's payload (of at most max bytes) and context
// and returns its size.
func (l *Limits) checkItem(i int, payload []byte, max int, context map[string]string) (int, error) {
	if len(payload) > max {
		return 0, &limitError{what: fmt.Sprintf("item %d", i), limit: "max_item_bytes", got: len(payload), max: max}
	}
	c := 0
	if len(context) > 0 {
		if c = wire.ContextSize(context); c > l.MaxContextBytes {
			return 0, &limitError{what: fmt.Sprintf("the context of item %d", i), limit: "max_context_bytes", got: c, max: l.MaxContextBytes}
		}
	}
	return len(payload) + c, nil
}

func (l *Limits) checkEncrypt(req *hsmdv1.EncryptRequest) error {
	if err := l.checkBatch(len(req.Items)); err != nil {
		return err
	}
	total := 0
	for i, it := range req.Items {
		n, err := l.checkItem(i, it.Plaintext, l.MaxItemBytes, it.Context)
		if err != nil {
			return err
		}
		total += n
	}
	return l.checkTotal(total)
}

func (l *Limits) checkDecrypt(req *hsmdv1.DecryptRequest) error {
	if err := l.checkBatch(len(req.Items)); err != nil {
		return err
	}
	total := 0
	for i, it := range req.Items {
		n, err := l.checkItem(i, it.Ciphertext, l.maxCiphertext(wire.IsText(it.Ciphertext)), it.Context)
		if err != nil {
			return err
		}
		total += n
	}
	return l.checkTotal(total)
}

func (l *Limits) checkTotal(total int) error {
	if total > l.MaxRequestBytes {
		return &limitError{what: "the request's payload", limit: "max_request_bytes", got: total, max: l.MaxRequestBytes}
	}
	return nil
}
