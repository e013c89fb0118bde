// Package client is the Go client of hsmd for platform services: batched
// envelope encryption, decryption and rewrapping, and the management of
// tenants and their keys, over hsmd's gRPC API (package hsmdv1).
//
// # Connecting
//
// [Dial] takes an address in one of these forms:
//
//	unix:///run/hsmd/hsmd.sock   a unix socket, absolute path
//	unix:var/hsmd.sock           a unix socket, path relative to the working directory
//	unix://./var/hsmd.sock       the same (a leading "./" or "../" after "unix://")
//	127.0.0.1:7443               TCP, host:port
//	hsmd-a:7443,hsmd-b:7443      TCP, replicas of one cluster: one is used at a time,
//	                             the next when it fails (Envelope calls that fail with
//	                             codes.Unavailable are retried on it, up to 3 times)
//
// hsmd serves TLS 1.3 on TCP: dial it with [WithTLS], which prefers the
// hybrid post-quantum key exchanges (see [TLSOptions]). TCP without
// transport credentials is allowed only to a loopback host ("localhost",
// 127.0.0.0/8, ::1), for a server configured without TLS; any other host
// needs [WithTLS] or [WithTransportCredentials]. Unix sockets are
// protected by file permissions.
//
// # Errors
//
// Errors returned by the server are gRPC status errors, returned as they
// are: inspect them with [google.golang.org/grpc/status.Code]. An unknown
// tenant is codes.NotFound, a request over a server limit is
// codes.InvalidArgument naming the limit, an unreachable server is
// codes.Unavailable. Errors that start in this package begin with
// "hsmd client: ".
//
// Decryption and rewrapping answer per item (see [Result]): any
// authentication failure is the single error [ErrDecrypt], by design; an
// input that is not a ciphertext wraps [ErrMalformed]; an item under a key
// version that refuses to decrypt wraps [ErrKeyDisabled], [ErrKeyDestroyed]
// or [ErrKeyRetired]; anything else is an [*ItemError].
//
// # Concurrency
//
// A [Client] is safe for concurrent use by many goroutines and should be
// shared: it holds one multiplexed connection. Every method honours its
// context; callers should set deadlines.
//
// # Batching
//
// [Client.Encrypt] and [Client.Decrypt] send one RPC per call, so a caller
// with many items at hand should pass them together. [Client.EncryptOne]
// and [Client.DecryptOne], the single-item calls, are coalesced
// ("auto-batching"): concurrent calls of one method and tenant share a
// batch RPC, so many goroutines that each seal one record get the
// throughput of batches without writing batch code. It is natural
// batching: a call is sent at once when no RPC of its method and tenant is
// in flight, so a lone caller waits for nothing. Calls that arrive while
// one is in flight queue, and the queue is sent as one RPC when the RPCs
// in flight have returned, or, while fewer than
// [AutoBatchOptions].MaxInFlight are in flight, as soon as it holds as
// many calls as the last batch answered; in any case when it reaches
// MaxItems or MaxBytes, or when it is MaxLinger old. [WithAutoBatch] sets
// these limits or turns auto-batching off; it is on by default.
//
// A coalesced call keeps the contract of a call of its own:
//   - Its result and its item's error are its own: one bad ciphertext
//     fails only its caller. An item over a server limit (which fails a
//     whole request with codes.InvalidArgument) is resent alone, so that
//     only it fails.
//   - An error of the whole RPC (codes.Unavailable, PermissionDenied,
//     ResourceExhausted, DeadlineExceeded, NotFound for an unknown tenant)
//     is the error of every call in it.
//   - If its context ends first it returns at once, with an error that
//     [errors.Is] matches to ctx.Err() and that status.Code maps to
//     codes.Canceled or codes.DeadlineExceeded (so does every single-item
//     call, auto-batched or not). The other calls of its batch carry on;
//     the RPC is cancelled when all of them have left. No RPC reads the
//     item's slices or context after the call returned (until then they
//     must not be modified, as for any call).
//   - The RPC's deadline is the latest of its callers' deadlines, or none
//     if one of them has none: set deadlines.
//
// Coalesced calls share one RPC: one server request ID (x-request-id),
// one audit entry, one authorization decision for the connection's
// identity. The RPC carries none of its callers' context values. A call
// whose context carries outgoing gRPC metadata
// ([google.golang.org/grpc/metadata.NewOutgoingContext]) is therefore
// never coalesced: it is sent alone, with its metadata, as is an item
// larger than MaxBytes. Calls that take [CallOption]s ([WithApproval])
// and the batch methods are never coalesced.
package client

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/experimental"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/internal/bufpool"
	"github.com/hsmd/hsmd/internal/grpccodec"
)

// DefaultMaxMsgSize is the default limit, in bytes, on a message the client
// sends or receives: above the largest response a server with default
// limits sends (64 MiB of payload, framing, and 58 bytes per item of a
// 10,000-item batch), so an accepted request never gets a reply the client
// refuses. Override it with [WithMaxRecvMsgSize] and [WithMaxSendMsgSize].
const DefaultMaxMsgSize = 80 << 20

// Client is a connection to one hsmd server. It is safe for concurrent use.
// Whoever calls [Dial] must call [Client.Close].
type Client struct {
	conn    *grpc.ClientConn
	env     hsmdv1.EnvelopeClient
	tenants hsmdv1.TenantsClient
	keys    hsmdv1.KeysClient
	// one carries the single-item calls. It is the seam for auto-batching:
	// a coalescer implementing singleSender replaces direct without
	// changing EncryptOne's or DecryptOne's contract.
	one singleSender

	closeOnce sync.Once
	closeErr  error
}

// singleSender sends single-item encryptions and decryptions.
type singleSender interface {
	encryptOne(ctx context.Context, tenant string, item Item) ([]byte, error)
	decryptOne(ctx context.Context, tenant string, item CiphertextItem) ([]byte, error)
}

// Option configures [Dial].
type Option func(*options)

type options struct {
	creds   credentials.TransportCredentials
	tls     *TLSOptions // set by WithTLS; used for TCP addresses
	maxRecv int
	maxSend int
	// autoBatch configures the single-item calls (WithAutoBatch).
	autoBatch AutoBatchOptions
}

// WithTransportCredentials sets the transport security of the connection
// (for example TLS from [google.golang.org/grpc/credentials.NewTLS]). It is
// required for TCP to a non-loopback host, unless [WithTLS] is given.
// It overrides an earlier [WithTLS], and the other way round.
func WithTransportCredentials(c credentials.TransportCredentials) Option {
	return func(o *options) { o.creds, o.tls = c, nil }
}

// WithMaxRecvMsgSize sets the largest response, in bytes, the client
// accepts. The default is [DefaultMaxMsgSize]. n must be positive.
func WithMaxRecvMsgSize(n int) Option {
	return func(o *options) { o.maxRecv = n }
}

// WithMaxSendMsgSize sets the largest request, in bytes, the client sends.
// The default is [DefaultMaxMsgSize]. n must be positive.
func WithMaxSendMsgSize(n int) Option {
	return func(o *options) { o.maxSend = n }
}

// Dial returns a client of the hsmd server at addr (see the package
// documentation for its forms). It does not wait for the connection: it
// fails only on a bad address or option, or if ctx is already done, and an
// unreachable server shows up as codes.Unavailable from the first call.
// ctx is not retained.
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	o := options{maxRecv: DefaultMaxMsgSize, maxSend: DefaultMaxMsgSize}
	for _, opt := range opts {
		opt(&o)
	}
	if o.maxRecv <= 0 || o.maxSend <= 0 {
		return nil, errors.New("hsmd client: message size limits must be positive")
	}
	if err := o.autoBatch.validate(); err != nil {
		return nil, err
	}
	target, dopts, err := dialTarget(addr, &o)
	if err != nil {
		return nil, err
	}
	dopts = append(dopts,
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(o.maxRecv), grpc.MaxCallSendMsgSize(o.maxSend), grpc.ForceCodecV2(grpccodec.Codec{})),
		experimental.WithBufferPool(bufpool.Shared))
	conn, err := grpc.NewClient(target, dopts...)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: %w", err)
	}
	c := &Client{
		conn:    conn,
		env:     hsmdv1.NewEnvelopeClient(conn),
		tenants: hsmdv1.NewTenantsClient(conn),
		keys:    hsmdv1.NewKeysClient(conn),
	}
	c.one = o.autoBatch.singleSender(c, min(o.maxSend, o.maxRecv))
	return c, nil
}

// Close releases the connection. It first drains the auto-batched calls
// (see "Batching" in the package documentation): it sends those still
// queued at once and waits until every [Client.EncryptOne] and
// [Client.DecryptOne] call begun before it has its answer or has returned
// on its context. Then the other calls in flight, and every later call,
// fail with codes.Canceled. Close is safe to call more than once; later
// calls return the first call's result.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		if d, ok := c.one.(drainer); ok {
			d.drain()
		}
		c.closeErr = c.conn.Close()
	})
	return c.closeErr
}
