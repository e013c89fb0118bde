package server

// Per-identity limits: how many calls one caller may have in flight
// (limits.max_concurrent_per_identity) and how fast it may make them
// (limits.rate_per_identity, limits.burst_per_identity).

import (
	"container/list"
	"context"
	"fmt"
	"math"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

const (
	// maxTrackedIdentities bounds the per-identity state: beyond it the
	// least recently seen identity is forgotten (a new identity is never
	// refused for want of room).
	maxTrackedIdentities = 10_000
	// identityIdle is how long an identity's state outlives its last call
	// (at least the time its bucket takes to fill again).
	identityIdle = 10 * time.Minute
	// concurrencyRetry is the RetryInfo delay of a call refused for
	// max_concurrent_per_identity.
	concurrencyRetry = 100 * time.Millisecond
)

// identityLimiter enforces the per-identity limits. It is safe for
// concurrent use.
type identityLimiter struct {
	maxConcurrent int
	rate          rate.Limit // 0: no rate limit
	burst         int
	idle          time.Duration
	max           int
	now           func() time.Time

	mu  sync.Mutex
	ids map[string]*list.Element // of *identityState
	lru list.List                // front: most recently seen
}

type identityState struct {
	id       string
	inflight int
	last     time.Time
	bucket   *rate.Limiter // nil without a rate limit
}

func newIdentityLimiter(l Limits, now func() time.Time) *identityLimiter {
	il := &identityLimiter{maxConcurrent: l.MaxConcurrentPerIdentity, rate: rate.Limit(l.RatePerIdentity), burst: l.BurstPerIdentity,
		idle: identityIdle, max: maxTrackedIdentities, now: now, ids: map[string]*list.Element{}}
	if il.rate > 0 {
		if fill := time.Duration(float64(il.burst) / float64(il.rate) * float64(time.Second)); fill > il.idle {
			il.idle = fill
		}
	}
	return il
}

// acquire admits a call of the identity id, or refuses it with
// RESOURCE_EXHAUSTED and a RetryInfo detail. An admitted call must call
// release when it is done.
func (il *identityLimiter) acquire(id string) (release func(), err error) {
	now := il.now()
	il.mu.Lock()
	defer il.mu.Unlock()
	st := il.lookup(id, now)
	if st.inflight >= il.maxConcurrent {
		return nil, exhausted(fmt.Sprintf("too many calls in flight from this caller: over the limit limits.max_concurrent_per_identity = %d", il.maxConcurrent), concurrencyRetry)
	}
	if st.bucket != nil {
		r := st.bucket.ReserveN(now, 1)
		if d := r.DelayFrom(now); !r.OK() || d > 0 {
			r.CancelAt(now)
			if !r.OK() {
				d = time.Second
			}
			return nil, exhausted(fmt.Sprintf("too many calls from this caller: over the limit limits.rate_per_identity = %g/s (limits.burst_per_identity = %d); retry in %v",
				float64(il.rate), il.burst, d.Round(time.Millisecond)), d)
		}
	}
	st.inflight++
	var once sync.Once
	return func() {
		once.Do(func() {
			il.mu.Lock()
			st.inflight--
			st.last = il.now()
			il.mu.Unlock()
		})
	}, nil
}

// lookup returns the state of id, made if need be, marked as seen now;
// it forgets idle identities and, over the bound, the least recently seen.
func (il *identityLimiter) lookup(id string, now time.Time) *identityState {
	for e := il.lru.Back(); e != nil; e = il.lru.Back() {
		st := e.Value.(*identityState)
		if st.id == id || st.inflight > 0 || now.Sub(st.last) < il.idle {
			break
		}
		il.remove(e)
	}
	if e, ok := il.ids[id]; ok {
		il.lru.MoveToFront(e)
		st := e.Value.(*identityState)
		st.last = now
		return st
	}
	for len(il.ids) >= il.max {
		// Forget the least recently seen identity. Calls of it still in
		// flight release their own (detached) state.
		il.remove(il.lru.Back())
	}
	st := &identityState{id: id, last: now}
	if il.rate > 0 {
		st.bucket = rate.NewLimiter(il.rate, il.burst)
	}
	il.ids[id] = il.lru.PushFront(st)
	return st
}

func (il *identityLimiter) remove(e *list.Element) {
	delete(il.ids, e.Value.(*identityState).id)
	il.lru.Remove(e)
}

func exhausted(msg string, retry time.Duration) error {
	st := status.New(codes.ResourceExhausted, msg)
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(retry)}); err == nil {
		st = d
	}
	return st.Err()
}

// limitIdentity is the identity the per-identity limits count a call
// against: the caller's identity (see callerIdentity), except that a TCP
// caller without a client certificate counts by its IP address, not its
// port, so that opening connections does not evade the limits.
func limitIdentity(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok {
		if _, isUnix := p.AuthInfo.(PeerCredAuthInfo); !isUnix && certIdentity(p.AuthInfo) == "" {
			if a, ok := p.Addr.(*net.TCPAddr); ok {
				return "tcp:" + a.IP.String()
			}
		}
	}
	return callerIdentity(ctx)
}

// burstDefault is the default burst of a rate: twice it, at least 1.
func burstDefault(r float64) int {
	return max(1, int(math.Min(math.Ceil(2*r), math.MaxInt32)))
}
