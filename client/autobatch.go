package client

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Defaults of [AutoBatchOptions]. The server's own defaults are 10,000
// items and 64 MiB of payload per request (its limits are not
// discoverable, so a client of a server configured lower sets
// MaxItems and MaxBytes to match).
const (
	// DefaultAutoBatchMaxItems is a tenth of the server's default
	// max_batch_items: a batch of 1,000 small items already costs the
	// server far more in sealing than in RPC overhead, and a smaller
	// batch answers its first caller sooner.
	DefaultAutoBatchMaxItems = 1000
	// DefaultAutoBatchMaxBytes is the server's default max_item_bytes and
	// a sixteenth of its max_request_bytes.
	DefaultAutoBatchMaxBytes = 4 << 20
	// DefaultAutoBatchMaxInFlight lets a second coalesced RPC of one
	// method and tenant overlap the first, so that client and server work
	// on different batches at once; more RPCs in flight make smaller
	// batches.
	DefaultAutoBatchMaxInFlight = 2
	// DefaultAutoBatchMaxLinger bounds the wait of a queued call behind
	// RPCs in flight. It is several times the time of a batch RPC on a
	// healthy server (well under a millisecond), so it only matters when
	// an RPC stalls.
	DefaultAutoBatchMaxLinger = 5 * time.Millisecond
)

// AutoBatchOptions configure the coalescing of concurrent
// [Client.EncryptOne] and [Client.DecryptOne] calls into batch RPCs (see
// "Batching" in the package documentation). A zero field means its
// default, so the zero value is auto-batching on with the defaults.
type AutoBatchOptions struct {
	// Disabled sends every single-item call as its own RPC.
	Disabled bool
	// MaxItems bounds the items of one coalesced RPC; default
	// DefaultAutoBatchMaxItems.
	MaxItems int
	// MaxBytes bounds the size of one coalesced RPC, counted as its items'
	// payloads and contexts plus 96 bytes per item (framing, and the
	// ciphertext's overhead in the response); default
	// DefaultAutoBatchMaxBytes. It is capped a little below the message
	// size limits ([WithMaxSendMsgSize], [WithMaxRecvMsgSize]). An item
	// over it is sent alone.
	MaxBytes int
	// MaxInFlight is how many RPCs of one method and tenant may be in
	// flight before a queued batch waits for one of them to return. While
	// fewer are (but at least one), a queued batch is sent as soon as it
	// holds as many calls as the last batch answered. 1 is classic natural
	// batching, one RPC at a time. Default DefaultAutoBatchMaxInFlight.
	MaxInFlight int
	// MaxLinger bounds the time a call queues: its batch is then sent
	// whatever is in flight, as is a full batch (MaxItems, MaxBytes).
	// Default DefaultAutoBatchMaxLinger.
	MaxLinger time.Duration
}

// WithAutoBatch configures the coalescing of single-item calls; see
// [AutoBatchOptions]. Without it auto-batching is on, with the defaults.
func WithAutoBatch(o AutoBatchOptions) Option {
	return func(op *options) { op.autoBatch = o }
}

func (o AutoBatchOptions) validate() error {
	if o.MaxItems < 0 || o.MaxBytes < 0 || o.MaxInFlight < 0 || o.MaxLinger < 0 {
		return errors.New("hsmd client: AutoBatchOptions fields must not be negative")
	}
	return nil
}

// singleSender returns what carries c's single-item calls under o, whose
// messages must fit in maxMsg bytes.
func (o AutoBatchOptions) singleSender(c *Client, maxMsg int) singleSender {
	if o.Disabled {
		return unbatched{c}
	}
	def := func(v, d int) int {
		if v == 0 {
			return d
		}
		return v
	}
	linger := o.MaxLinger
	if linger == 0 {
		linger = DefaultAutoBatchMaxLinger
	}
	b := &batcher{
		c:           c,
		maxItems:    def(o.MaxItems, DefaultAutoBatchMaxItems),
		maxBytes:    min(def(o.MaxBytes, DefaultAutoBatchMaxBytes), maxMsg-msgHeadroom),
		maxInFlight: def(o.MaxInFlight, DefaultAutoBatchMaxInFlight),
		linger:      linger,
		queues:      map[batchKey]*queue{},
		work:        make(chan *batch),
		quit:        make(chan struct{}),
	}
	b.readDone.L = &b.mu
	b.waiters.New = func() any { return &waiter{done: make(chan struct{}, 1)} }
	return b
}

// drainer is a singleSender that Close must drain before the connection
// closes.
type drainer interface{ drain() }

// unbatched sends each single-item call as its own RPC (auto-batching
// off), with the errors of a batcher's.
type unbatched struct{ c *Client }

func (u unbatched) encryptOne(ctx context.Context, tenant string, item Item) ([]byte, error) {
	out, err := direct(u).encryptOne(ctx, tenant, item)
	return out, contextError(ctx, err)
}

func (u unbatched) decryptOne(ctx context.Context, tenant string, item CiphertextItem) ([]byte, error) {
	out, err := direct(u).decryptOne(ctx, tenant, item)
	return out, contextError(ctx, err)
}

// ctxError is the error of a single-item call whose context ended first.
// errors.Is matches it with the context's error, and status.Code gives
// codes.Canceled or codes.DeadlineExceeded, as for an RPC.
type ctxError struct{ err error }

func (e *ctxError) Error() string              { return "hsmd client: " + e.err.Error() }
func (e *ctxError) Unwrap() error              { return e.err }
func (e *ctxError) GRPCStatus() *status.Status { return status.FromContextError(e.err) }

// contextError returns err, or a *ctxError if err is a gRPC status for
// the end of ctx (whose timer may not have fired yet when a server's
// DEADLINE_EXCEEDED arrives).
func contextError(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	switch status.Code(err) {
	case codes.Canceled:
		if e := ctx.Err(); e != nil {
			return &ctxError{e}
		}
	case codes.DeadlineExceeded:
		if e := ctx.Err(); e != nil {
			return &ctxError{e}
		}
		if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
			return &ctxError{context.DeadlineExceeded}
		}
	}
	return err
}
