package client

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/metadata"
)

const (
	// itemOverhead is what an item adds to a request or response beyond
	// its payload and context: the ciphertext's header and tag (58 bytes)
	// and protobuf framing.
	itemOverhead = 96
	// contextEntryOverhead is the framing of one context entry.
	contextEntryOverhead = 8
	// msgHeadroom keeps a batch below the message size limits: the tenant
	// name and the message's own framing.
	msgHeadroom = 1 << 10
)

// itemSize is what one item counts towards AutoBatchOptions.MaxBytes.
func itemSize(payload []byte, ctx map[string]string) int {
	n := len(payload) + itemOverhead
	for k, v := range ctx {
		n += len(k) + len(v) + contextEntryOverhead
	}
	return n
}

// batchOp is the method of a batch.
type batchOp uint8

const (
	opEncrypt batchOp = iota
	opDecrypt
)

// batchKey is what the items of one batch share: everything in a request
// but its items. Encrypt and Decrypt requests carry nothing else per
// request but the tenant (Decrypt's may be empty).
type batchKey struct {
	op     batchOp
	tenant string
}

// batcher coalesces single-item calls by natural batching: a call is sent
// at once, as its own RPC in its caller's goroutine, while no RPC of its
// key is in flight; otherwise it queues in its key's pending batch, which
// is sent (see due) when the RPCs in flight return, or when fewer than
// maxInFlight are and it holds as many calls as the last batch answered,
// or when it is full, or when it is linger old. Batch RPCs run in runner
// goroutines, one per batch in flight, reused. It is safe for concurrent
// use.
type batcher struct {
	c           *Client
	maxItems    int
	maxBytes    int
	maxInFlight int
	linger      time.Duration

	mu       sync.Mutex
	readDone sync.Cond // on mu: an RPC has finished encoding its items
	readers  int       // callers waiting on readDone
	queues   map[batchKey]*queue
	free     []*queue // idle queues, for reuse
	closed   bool
	wg       sync.WaitGroup // calls sent at once, and runners
	work     chan *batch    // hands a batch to an idle runner
	quit     chan struct{}  // closed by drain: idle runners exit

	waiters sync.Pool // *waiter
	batches sync.Pool // *batch
}

// queue is the state of one batchKey. Its fields are guarded by b.mu.
type queue struct {
	b        *batcher
	key      batchKey
	inflight int    // RPCs in flight
	lastDone int    // calls in the last batch answered
	pending  *batch // the batch being formed, or nil
	timer    *time.Timer
}

// waitState is where a waiter is; it changes under b.mu.
type waitState uint8

const (
	waiting   waitState = iota // its caller waits for the answer
	answered                   // out and err are set, and done is (being) signalled
	abandoned                  // its caller left: the batch recycles it
)

// waiter is one single-item call.
type waiter struct {
	payload []byte
	context map[string]string
	size    int
	bt      *batch
	state   waitState
	reading bool // an RPC is encoding payload and context (under b.mu)
	out     []byte
	err     error
	done    chan struct{} // capacity 1: signalled once answered
}

func (b *batcher) encryptOne(ctx context.Context, tenant string, item Item) ([]byte, error) {
	return b.do(ctx, batchKey{opEncrypt, tenant}, item.Plaintext, item.Context)
}

func (b *batcher) decryptOne(ctx context.Context, tenant string, item CiphertextItem) ([]byte, error) {
	return b.do(ctx, batchKey{opDecrypt, tenant}, item.Ciphertext, item.Context)
}

// do runs one single-item call: at once, in a pending batch, or alone.
func (b *batcher) do(ctx context.Context, key batchKey, payload []byte, actx map[string]string) ([]byte, error) {
	size := itemSize(payload, actx)
	if size > b.maxBytes || hasMetadata(ctx) {
		return b.direct(ctx, key, payload, actx)
	}
	if err := ctx.Err(); err != nil {
		return nil, &ctxError{err}
	}
	w := b.waiters.Get().(*waiter)
	w.payload, w.context, w.size = payload, actx, size
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		b.putWaiter(w)
		return b.direct(ctx, key, payload, actx)
	}
	q := b.queue(key)
	if q.inflight == 0 { // nobody to wait for: send at once
		q.inflight++
		b.wg.Add(1)
		bt := b.newBatch(q)
		bt.add(ctx, w)
		b.mu.Unlock()
		return b.sendNow(ctx, bt, w)
	}
	b.enqueue(ctx, q, w)
	b.mu.Unlock()
	return b.wait(ctx, w)
}

// enqueue adds w, the call of ctx, to q's pending batch, and sends the
// batch if that makes it due or full. b.mu is held.
func (b *batcher) enqueue(ctx context.Context, q *queue, w *waiter) {
	bt := q.pending
	if bt != nil && (len(bt.ws) >= b.maxItems || bt.bytes+w.size > b.maxBytes) {
		b.launch(q)
		bt = nil
	}
	if bt == nil {
		bt = b.newBatch(q)
		bt.since = time.Now()
		q.pending = bt
		q.arm(b.linger)
	}
	bt.add(ctx, w)
	if len(bt.ws) >= b.maxItems || b.due(q) {
		b.launch(q)
	}
}

// hasMetadata reports whether ctx carries outgoing gRPC metadata, which
// belongs to one call and so cannot ride in a shared RPC.
func hasMetadata(ctx context.Context) bool {
	_, ok := metadata.FromOutgoingContext(ctx)
	return ok
}

// direct sends one item as its own RPC, outside the batcher.
func (b *batcher) direct(ctx context.Context, key batchKey, payload []byte, actx map[string]string) ([]byte, error) {
	if key.op == opEncrypt {
		return unbatched{b.c}.encryptOne(ctx, key.tenant, Item{Plaintext: payload, Context: actx})
	}
	return unbatched{b.c}.decryptOne(ctx, key.tenant, CiphertextItem{Ciphertext: payload, Context: actx})
}

// sendNow sends bt, which holds w alone, in the caller's goroutine and with
// its context; then it starts the batch that queued meanwhile, if any.
func (b *batcher) sendNow(ctx context.Context, bt *batch, w *waiter) ([]byte, error) {
	if err := b.send(ctx, bt, bt.ws, true); err != nil {
		w.out, w.err = nil, err
	}
	out, err := w.out, w.err
	b.mu.Lock()
	q := bt.q
	q.inflight--
	q.lastDone = 1
	if next := b.ready(q); next != nil {
		b.start(next)
	} else {
		b.release(q)
	}
	b.mu.Unlock()
	b.wg.Done()
	b.putWaiter(w)
	b.putBatch(bt)
	return out, contextError(ctx, err)
}

// wait waits for w's answer, or for ctx.
func (b *batcher) wait(ctx context.Context, w *waiter) ([]byte, error) {
	select {
	case <-w.done:
		return b.answer(ctx, w)
	case <-ctx.Done():
	}
	b.mu.Lock()
	for w.reading { // the RPC is encoding the item: a matter of microseconds
		b.readers++
		b.readDone.Wait()
		b.readers--
	}
	if w.state == answered {
		b.mu.Unlock()
		<-w.done
		return b.answer(ctx, w)
	}
	w.state = abandoned
	bt := w.bt
	if bt.live--; bt.live == 0 && bt.cancel != nil {
		bt.cancel()
	}
	b.mu.Unlock()
	return nil, &ctxError{ctx.Err()}
}

// answer returns w's answer and recycles it. An RPC ends by its deadline
// only when every caller's context has ended, and an RPC cancelled when
// its callers left answers none of them: contextError names such an
// error by the caller's context.
func (b *batcher) answer(ctx context.Context, w *waiter) ([]byte, error) {
	out, err := w.out, w.err
	b.putWaiter(w)
	return out, contextError(ctx, err)
}

// launch sends q's pending batch. b.mu is held.
func (b *batcher) launch(q *queue) {
	q.inflight++
	b.start(q.take())
}

// start hands bt to an idle runner, or to a new one. b.mu is held.
func (b *batcher) start(bt *batch) {
	select {
	case b.work <- bt:
	default:
		b.wg.Add(1)
		go b.runner(bt)
	}
}

// runnerIdle is how long a runner waits for work before it exits.
const runnerIdle = time.Second

// runner runs bt, and the batches of its queue that are due when one
// returns, then waits for another batch. Runners are reused, rather than
// started per batch, because a new goroutine grows its stack for gRPC at
// each batch.
func (b *batcher) runner(bt *batch) {
	defer b.wg.Done()
	idle := time.NewTimer(runnerIdle)
	defer idle.Stop()
	for {
		for bt != nil {
			bt = b.run(bt)
		}
		idle.Reset(runnerIdle)
		select {
		case bt = <-b.work:
		case <-idle.C:
			return
		case <-b.quit:
			return
		}
	}
}

// due reports whether q's pending batch is to be sent now: when nothing
// is in flight, or when fewer than maxInFlight RPCs are and the batch
// holds as many calls as the last one answered (whose callers, in a
// steady state, come back together). b.mu is held.
func (b *batcher) due(q *queue) bool {
	return q.pending != nil && (q.inflight == 0 || q.inflight < b.maxInFlight && len(q.pending.ws) >= q.lastDone)
}

// ready takes q's pending batch for sending if it is due. b.mu is held.
func (b *batcher) ready(q *queue) *batch {
	if !b.due(q) {
		return nil
	}
	q.inflight++
	return q.take()
}

// complete answers bt's waiting callers, recycles the waiters whose
// callers left, and returns the batch of bt's queue that is now due, if
// any.
func (b *batcher) complete(bt *batch) *batch {
	b.mu.Lock()
	notify := bt.notify[:0]
	for _, w := range bt.ws {
		switch w.state {
		case abandoned:
			b.putWaiter(w)
		case waiting:
			w.state = answered
			notify = append(notify, w)
		}
	}
	q := bt.q
	q.inflight--
	q.lastDone = len(bt.ws)
	next := b.ready(q)
	b.release(q)
	b.mu.Unlock()
	for _, w := range notify {
		w.done <- struct{}{}
	}
	bt.notify = notify
	b.putBatch(bt)
	return next
}

// queue returns key's queue, making it if needed. b.mu is held.
func (b *batcher) queue(key batchKey) *queue {
	if q, ok := b.queues[key]; ok {
		return q
	}
	var q *queue
	if n := len(b.free); n > 0 {
		q, b.free = b.free[n-1], b.free[:n-1]
	} else {
		q = &queue{b: b}
	}
	q.key = key
	b.queues[key] = q
	return q
}

// release forgets q if it is idle. b.mu is held.
func (b *batcher) release(q *queue) {
	if q.inflight > 0 || q.pending != nil {
		return
	}
	delete(b.queues, q.key)
	q.key, q.lastDone = batchKey{}, 0
	if len(b.free) < 64 {
		b.free = append(b.free, q)
	}
}

// arm starts q's linger timer for its new pending batch. b.mu is held.
func (q *queue) arm(d time.Duration) {
	if q.timer == nil {
		q.timer = time.AfterFunc(d, q.lingered)
		return
	}
	q.timer.Reset(d)
}

// take removes q's pending batch. b.mu is held.
func (q *queue) take() *batch {
	bt := q.pending
	q.pending = nil
	q.timer.Stop()
	return bt
}

// lingered sends q's pending batch if it has waited long enough.
func (q *queue) lingered() {
	b := q.b
	b.mu.Lock()
	defer b.mu.Unlock()
	bt := q.pending
	if bt == nil {
		return
	}
	if d := b.linger - time.Since(bt.since); d > 0 { // a stale timer
		q.timer.Reset(d)
		return
	}
	b.launch(q)
}

func (b *batcher) putWaiter(w *waiter) {
	done := w.done
	if done == nil {
		done = make(chan struct{}, 1)
	}
	*w = waiter{done: done}
	b.waiters.Put(w)
}

// drain sends the pending batches at once and waits for every call the
// batcher has taken to be answered (or its caller to leave); later calls
// go directly to the connection.
func (b *batcher) drain() {
	b.mu.Lock()
	b.closed = true
	for _, q := range b.queues {
		if q.pending != nil {
			b.launch(q)
		}
	}
	b.mu.Unlock()
	close(b.quit)
	b.wg.Wait()
}
