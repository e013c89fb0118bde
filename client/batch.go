package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/internal/grpccodec"
)

// errNoAnswer is the error of an item a batch somehow failed to answer.
var errNoAnswer = errors.New("hsmd client: internal error: the batch did not answer the item")

// batch is the items of one RPC (or, after an INVALID_ARGUMENT, of one RPC
// per item) and the reusable storage of its request.
type batch struct {
	b         *batcher
	q         *queue
	ws        []*waiter // every waiter that joined
	bytes     int
	live      int // waiters still waiting (under b.mu)
	since     time.Time
	deadline  time.Time
	unbounded bool               // a caller has no deadline
	cancel    context.CancelFunc // of the RPC in flight (under b.mu)

	cands  []*waiter // the waiters the RPC being sent is for
	sent   []*waiter // those the request holds, in order (set by fill)
	notify []*waiter
	alone  []*waiter
	one    [1]*waiter

	enc      hsmdv1.EncryptRequest
	dec      hsmdv1.DecryptRequest
	encItems []hsmdv1.EncryptItem
	decItems []hsmdv1.DecryptItem
	encPtrs  []*hsmdv1.EncryptItem
	decPtrs  []*hsmdv1.DecryptItem
	codec    []grpc.CallOption // the batchCodec
}

// run sends bt in an RPC with its own context (see rpcContext), answers
// its callers, and returns the batch of its queue to send next, if any.
func (b *batcher) run(bt *batch) *batch {
	b.mu.Lock()
	live := bt.live
	var ctx context.Context
	if live > 0 {
		ctx, bt.cancel = bt.rpcContext()
	}
	b.mu.Unlock()
	if live > 0 {
		err := b.send(ctx, bt, bt.ws, false)
		if status.Code(err) == codes.InvalidArgument && len(bt.sent) > 1 {
			// One item over a server limit fails the whole request: send
			// each alone, so that only such an item fails.
			b.sendAlone(ctx, bt)
			err = nil
		}
		if err != nil {
			for _, w := range bt.ws {
				w.out, w.err = nil, err
			}
		}
		bt.cancel()
	}
	return b.complete(bt)
}

// sendAlone sends each item of bt's last RPC alone.
func (b *batcher) sendAlone(ctx context.Context, bt *batch) {
	bt.alone = append(bt.alone[:0], bt.sent...)
	for _, w := range bt.alone {
		b.mu.Lock()
		gone := w.state != waiting
		b.mu.Unlock()
		if gone {
			continue
		}
		bt.one[0] = w
		if err := b.send(ctx, bt, bt.one[:], false); err != nil {
			w.out, w.err = nil, err
		}
	}
	clear(bt.alone)
}

// send makes one RPC of bt's method for the waiters cands. The request is
// filled (by batchCodec) only as gRPC encodes it, from the cands whose
// callers still wait; on success each of those gets its result. A call
// sent at once by its own caller, who cannot leave before the RPC
// returns, needs no such care (own): its request is filled beforehand,
// and the RPC is then exactly that of an unbatched call.
func (b *batcher) send(ctx context.Context, bt *batch, cands []*waiter, own bool) error {
	bt.cands, bt.sent = cands, bt.sent[:0]
	defer func() { bt.cands = nil }()
	opts := bt.codec
	if own {
		bt.fill()
		defer bt.unfill()
		opts = nil
	}
	tenant := bt.q.key.tenant
	if bt.q.key.op == opEncrypt {
		bt.enc.Tenant = tenant
		resp, err := b.c.env.Encrypt(ctx, &bt.enc, opts...)
		if err != nil {
			return err
		}
		cts := resp.GetCiphertexts()
		if len(cts) != len(bt.sent) {
			return fmt.Errorf("hsmd client: server returned %d ciphertexts for %d items", len(cts), len(bt.sent))
		}
		// The ciphertexts share the response's buffer: each caller gets
		// its own copy, so that keeping one keeps only it.
		for i, w := range bt.sent {
			w.out, w.err = bytes.Clone(cts[i]), nil
		}
		return nil
	}
	bt.dec.Tenant = tenant
	resp, err := b.c.env.Decrypt(ctx, &bt.dec, opts...)
	if err != nil {
		return err
	}
	rs := resp.GetResults()
	if len(rs) != len(bt.sent) {
		return fmt.Errorf("hsmd client: server returned %d results for %d items", len(rs), len(bt.sent))
	}
	for i, w := range bt.sent {
		if e := rs[i].GetError(); e != nil {
			w.out, w.err = nil, itemErr(e)
		} else {
			w.out, w.err = bytes.Clone(rs[i].GetPlaintext()), nil
		}
	}
	return nil
}

// fill puts into bt's request the items of the cands whose callers still
// wait, and marks them being read: their callers, if they leave, wait
// for unfill first, so that no RPC reads an item after its call returned.
func (bt *batch) fill() {
	b := bt.b
	b.mu.Lock()
	bt.sent = bt.sent[:0]
	for _, w := range bt.cands {
		if w.state == waiting {
			w.reading = true
			bt.sent = append(bt.sent, w)
		}
	}
	b.mu.Unlock()
	n := len(bt.sent)
	if bt.q.key.op == opEncrypt {
		bt.encItems, bt.encPtrs = growItems(bt.encItems, bt.encPtrs, n)
		for i, w := range bt.sent {
			bt.encItems[i].Plaintext, bt.encItems[i].Context = w.payload, w.context
		}
		bt.enc.Items = bt.encPtrs[:n]
		return
	}
	bt.decItems, bt.decPtrs = growItems(bt.decItems, bt.decPtrs, n)
	for i, w := range bt.sent {
		bt.decItems[i].Ciphertext, bt.decItems[i].Context = w.payload, w.context
	}
	bt.dec.Items = bt.decPtrs[:n]
}

// growItems returns items (reused request items) and ptrs (pointers to
// each, as the request holds them) with room for n, reallocated at twice
// the size when they have less.
func growItems[T any](items []T, ptrs []*T, n int) ([]T, []*T) {
	if cap(items) >= n {
		return items, ptrs
	}
	items = make([]T, max(n, 2*cap(items)))
	ptrs = make([]*T, len(items))
	for i := range items {
		ptrs[i] = &items[i]
	}
	return items, ptrs
}

// unfill drops the request's references to the callers' items once
// encoded, and lets callers waiting to leave go.
func (bt *batch) unfill() {
	for i := range bt.enc.Items {
		bt.encItems[i].Plaintext, bt.encItems[i].Context = nil, nil
	}
	for i := range bt.dec.Items {
		bt.decItems[i].Ciphertext, bt.decItems[i].Context = nil, nil
	}
	bt.enc.Items, bt.dec.Items = nil, nil
	b := bt.b
	b.mu.Lock()
	for _, w := range bt.sent {
		w.reading = false
	}
	if b.readers > 0 {
		b.readDone.Broadcast()
	}
	b.mu.Unlock()
}

// batchCodec is hsmd's codec (internal/grpccodec), but it fills its
// batch's request just before encoding it and empties it just after.
type batchCodec struct{ bt *batch }

var protoCodec grpccodec.Codec

func (c batchCodec) Name() string { return grpcproto.Name }

func (c batchCodec) Marshal(v any) (mem.BufferSlice, error) {
	if v != any(&c.bt.enc) && v != any(&c.bt.dec) {
		return protoCodec.Marshal(v)
	}
	c.bt.fill()
	defer c.bt.unfill()
	return protoCodec.Marshal(v)
}

func (c batchCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return protoCodec.Unmarshal(data, v)
}

// add puts w, the call of ctx, into bt. b.mu is held.
func (bt *batch) add(ctx context.Context, w *waiter) {
	bt.ws = append(bt.ws, w)
	bt.bytes += w.size
	bt.live++
	w.bt, w.state, w.out, w.err = bt, waiting, nil, errNoAnswer
	if d, ok := ctx.Deadline(); !ok {
		bt.unbounded = true
	} else if d.After(bt.deadline) {
		bt.deadline = d
	}
}

// rpcContext is the context of a batch RPC: no caller's values (gRPC
// metadata among them), and the latest of its callers' deadlines, or none
// if one of them has none. It is cancelled when every caller has left.
func (bt *batch) rpcContext() (context.Context, context.CancelFunc) {
	if bt.unbounded {
		return context.WithCancel(context.Background())
	}
	return context.WithDeadline(context.Background(), bt.deadline)
}

func (b *batcher) newBatch(q *queue) *batch {
	bt, _ := b.batches.Get().(*batch)
	if bt == nil {
		bt = &batch{b: b}
		bt.codec = []grpc.CallOption{grpc.ForceCodecV2(batchCodec{bt})}
	}
	bt.q = q
	bt.bytes = len(q.key.tenant)
	return bt
}

func (b *batcher) putBatch(bt *batch) {
	clear(bt.ws)
	clear(bt.sent)
	clear(bt.notify)
	bt.ws, bt.sent, bt.notify = bt.ws[:0], bt.sent[:0], bt.notify[:0]
	bt.q, bt.live, bt.cancel = nil, 0, nil
	bt.since, bt.deadline, bt.unbounded = time.Time{}, time.Time{}, false
	b.batches.Put(bt)
}
