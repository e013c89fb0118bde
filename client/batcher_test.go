package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func TestAutoBatchCoalesces(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	a := blockOne(t, g, c)
	var bs []*call
	for i := range 10 {
		bs = append(bs, goEncrypt(t.Context(), c, "t1", fmt.Sprint("b", i)))
	}
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 10)
	g.none(t, 20*time.Millisecond) // queued behind the call in flight, not sent
	g.release <- struct{}{}
	if a.wait(t); a.err != nil || string(a.out) != "ct:t1:a" {
		t.Fatalf("the first call: %q, %v", a.out, a.err)
	}
	if s := g.next(t); s.items != 10 {
		t.Fatalf("the queued calls came in an RPC of %d items, want 10", s.items)
	}
	close(g.release)
	for i, b := range bs {
		if b.wait(t); b.err != nil || string(b.out) != fmt.Sprint("ct:t1:b", i) {
			t.Errorf("call %d: %q, %v", i, b.out, b.err)
		}
	}
}

// TestAutoBatchKeys: calls of other tenants or methods are not coalesced
// with each other, and a method and tenant with nothing in flight is sent
// at once.
func TestAutoBatchKeys(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	blockOne(t, g, c)
	goEncrypt(t.Context(), c, "t2", "x")
	if s := g.next(t); s.items != 1 {
		t.Fatalf("another tenant's call waited: %+v", s)
	}
	goCall(func() ([]byte, error) {
		return c.DecryptOne(t.Context(), "t1", CiphertextItem{Ciphertext: []byte("ct:t1:y")})
	})
	if s := g.next(t); s.items != 1 {
		t.Fatalf("a decryption waited behind an encryption: %+v", s)
	}
	close(g.release)
}

// TestAutoBatchSecondInFlight: with MaxInFlight 2, a call is sent at once
// while one RPC is in flight, and then a queue is sent while one RPC is
// in flight once it holds as many calls as the last batch answered.
func TestAutoBatchSecondInFlight(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 2, MaxLinger: time.Hour})
	key := batchKey{opEncrypt, "t1"}
	calls := []*call{goEncrypt(t.Context(), c, "t1", "a")}
	sa := g.next(t)
	calls = append(calls, goEncrypt(t.Context(), c, "t1", "b"))
	if s := g.next(t); s.items != 1 {
		t.Fatalf("the second call came in an RPC of %d items", s.items)
	}
	calls = append(calls, goEncrypt(t.Context(), c, "t1", "c"), goEncrypt(t.Context(), c, "t1", "d"))
	waitQueued(t, c, key, 2) // two RPCs in flight
	close(sa.proceed)        // one returns: the queue goes
	scd := g.next(t)
	if scd.items != 2 {
		t.Fatalf("the queue came in an RPC of %d items, want 2", scd.items)
	}
	close(scd.proceed) // the last batch answered has 2 calls
	calls[2].wait(t)
	calls[3].wait(t)
	calls = append(calls, goEncrypt(t.Context(), c, "t1", "e"))
	waitQueued(t, c, key, 1)
	g.none(t, 20*time.Millisecond) // 1 call queued, fewer than 2
	calls = append(calls, goEncrypt(t.Context(), c, "t1", "f"))
	if s := g.next(t); s.items != 2 {
		t.Fatalf("the queue of 2 came in an RPC of %d items", s.items)
	}
	close(g.release)
	for i, cl := range calls {
		if cl.wait(t); cl.err != nil || string(cl.out) != "ct:t1:"+string(rune('a'+i)) {
			t.Errorf("call %d: %q, %v", i, cl.out, cl.err)
		}
	}
}

func TestAutoBatchPerItemErrors(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	first := goCall(func() ([]byte, error) {
		return c.DecryptOne(t.Context(), "", CiphertextItem{Ciphertext: []byte("ct:t1:0")})
	})
	g.next(t)
	cts := []string{"ct:t1:good", "tampered", "garbage", "nokey", "ct:t1:also good"}
	var calls []*call
	for _, ct := range cts {
		calls = append(calls, goCall(func() ([]byte, error) {
			return c.DecryptOne(t.Context(), "", CiphertextItem{Ciphertext: []byte(ct)})
		}))
	}
	waitQueued(t, c, batchKey{opDecrypt, ""}, len(cts))
	close(g.release)
	first.wait(t)
	if s := g.next(t); s.items != len(cts) {
		t.Fatalf("an RPC of %d items, want %d", s.items, len(cts))
	}
	for _, cl := range calls {
		cl.wait(t)
	}
	var ie *ItemError
	switch {
	case calls[0].err != nil || string(calls[0].out) != "good":
		t.Errorf("good item: %q, %v", calls[0].out, calls[0].err)
	case calls[1].err != ErrDecrypt:
		t.Errorf("tampered item: %v, want exactly ErrDecrypt", calls[1].err)
	case !errors.Is(calls[2].err, ErrMalformed):
		t.Errorf("malformed item: %v", calls[2].err)
	case !errors.As(calls[3].err, &ie) || ie.Code != codes.Unavailable:
		t.Errorf("unavailable item: %v", calls[3].err)
	case calls[4].err != nil || string(calls[4].out) != "also good":
		t.Errorf("second good item: %q, %v", calls[4].out, calls[4].err)
	}
}

// TestAutoBatchWholeCallError: an error of the RPC is every caller's.
func TestAutoBatchWholeCallError(t *testing.T) {
	for _, tt := range []struct {
		tenant string
		code   codes.Code
	}{{"missing", codes.NotFound}, {"denied", codes.PermissionDenied}} {
		g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
		a := goEncrypt(t.Context(), c, tt.tenant, "a")
		g.next(t)
		var bs []*call
		for i := range 3 {
			bs = append(bs, goEncrypt(t.Context(), c, tt.tenant, fmt.Sprint(i)))
		}
		waitQueued(t, c, batchKey{opEncrypt, tt.tenant}, 3)
		close(g.release)
		if s := g.next(t); s.items != 3 {
			t.Fatalf("an RPC of %d items, want 3", s.items)
		}
		for _, cl := range append(bs, a) {
			if cl.wait(t); status.Code(cl.err) != tt.code {
				t.Errorf("tenant %s: %v, want %s", tt.tenant, cl.err, tt.code)
			}
		}
	}
}

// TestAutoBatchServerLimit: a request refused whole (INVALID_ARGUMENT)
// because of one item is resent item by item, so only that item fails.
func TestAutoBatchServerLimit(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	g.maxItem = 3
	blockOne(t, g, c)
	pts := []string{"ok1", "toolong", "ok2", "ok3"}
	var calls []*call
	for _, pt := range pts {
		calls = append(calls, goEncrypt(t.Context(), c, "t1", pt))
	}
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, len(pts))
	close(g.release)
	var sizes []int
	for range 1 + len(pts) {
		sizes = append(sizes, g.next(t).items)
	}
	if fmt.Sprint(sizes) != "[4 1 1 1 1]" {
		t.Errorf("RPC sizes after the blocked one: %v, want [4 1 1 1 1]", sizes)
	}
	for i, cl := range calls {
		cl.wait(t)
		if pts[i] == "toolong" {
			if status.Code(cl.err) != codes.InvalidArgument {
				t.Errorf("the item over the limit: %v, want InvalidArgument", cl.err)
			}
		} else if cl.err != nil || string(cl.out) != "ct:t1:"+pts[i] {
			t.Errorf("%s: %q, %v", pts[i], cl.out, cl.err)
		}
	}
}

// TestAutoBatchCancel: a caller whose context ends returns at once with
// its context's error, queued or in flight, and the others carry on; an
// RPC whose callers all left is cancelled; a cancelled queued item is not
// sent.
func TestAutoBatchCancel(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	a := blockOne(t, g, c)

	// Queued: b1 leaves before its batch is sent.
	ctx1, cancel1 := context.WithCancel(t.Context())
	b1 := goEncrypt(ctx1, c, "t1", "b1")
	b2 := goEncrypt(t.Context(), c, "t1", "b2")
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 2)
	cancel1()
	b1.wait(t)
	checkCanceled(t, b1.err, context.Canceled, codes.Canceled)
	g.release <- struct{}{}
	a.wait(t)
	if s := g.next(t); s.items != 1 {
		t.Fatalf("the batch of b1 (cancelled) and b2 has %d items in its RPC, want 1", s.items)
	}

	// In flight: c1 leaves while its RPC is held; c2 gets its answer.
	ctx2, cancel2 := context.WithTimeout(t.Context(), time.Hour)
	defer cancel2()
	c1 := goEncrypt(ctx2, c, "t1", "c1")
	c2 := goEncrypt(t.Context(), c, "t1", "c2")
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 2)
	g.release <- struct{}{} // b2's RPC
	if b2.wait(t); b2.err != nil || string(b2.out) != "ct:t1:b2" {
		t.Fatalf("b2: %q, %v", b2.out, b2.err)
	}
	if s := g.next(t); s.items != 2 {
		t.Fatalf("c1 and c2 in an RPC of %d items", s.items)
	}
	cancel2()
	c1.wait(t)
	checkCanceled(t, c1.err, context.Canceled, codes.Canceled)
	select {
	case <-c2.done:
		t.Fatal("c2 returned when c1 left")
	case <-time.After(20 * time.Millisecond):
	}
	g.release <- struct{}{}
	if c2.wait(t); c2.err != nil || string(c2.out) != "ct:t1:c2" {
		t.Fatalf("c2: %q, %v", c2.out, c2.err)
	}

	// All callers of an RPC in flight leave: it is cancelled.
	blocked := blockOne(t, g, c)
	ctx3, cancel3 := context.WithCancel(t.Context())
	d1, d2 := goEncrypt(ctx3, c, "t1", "d1"), goEncrypt(ctx3, c, "t1", "d2")
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 2)
	g.release <- struct{}{}
	blocked.wait(t)
	g.next(t)
	cancel3()
	for _, d := range []*call{d1, d2} {
		d.wait(t)
		checkCanceled(t, d.err, context.Canceled, codes.Canceled)
	}
	for start := time.Now(); g.cancelled.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Since(start) > 10*time.Second {
			t.Fatal("the RPC was not cancelled when its callers left")
		}
	}
}

// TestSingleCallDeadline: a single-item call that runs out of time
// returns an error that is both the context's and the status's, with
// auto-batching off, and on for a call sent at once and for a queued one.
func TestSingleCallDeadline(t *testing.T) {
	for _, o := range []AutoBatchOptions{{Disabled: true}, {MaxInFlight: 1, MaxLinger: time.Hour}} {
		g, c := dialGated(t, o)
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		calls := []*call{goEncrypt(ctx, c, "t1", "x")}
		g.next(t) // the gate holds it
		if !o.Disabled {
			calls = append(calls, goEncrypt(ctx, c, "t1", "y")) // queued
		}
		for _, cl := range calls {
			cl.wait(t)
			checkCanceled(t, cl.err, context.DeadlineExceeded, codes.DeadlineExceeded)
		}
	}
}

func checkCanceled(t *testing.T, err, want error, code codes.Code) {
	t.Helper()
	if !errors.Is(err, want) || status.Code(err) != code || !strings.HasPrefix(err.Error(), "hsmd client: ") {
		t.Errorf("error %v (%s), want %v (%s)", err, status.Code(err), want, code)
	}
}

// TestAutoBatchDeadline: a batch RPC's deadline is its callers' latest,
// or none if one has none.
func TestAutoBatchDeadline(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	a := blockOne(t, g, c)
	ctx1, cancel1 := context.WithTimeout(t.Context(), time.Hour)
	defer cancel1()
	ctx2, cancel2 := context.WithTimeout(t.Context(), 2*time.Hour)
	defer cancel2()
	b1, b2 := goEncrypt(ctx1, c, "t1", "1"), goEncrypt(ctx2, c, "t1", "2")
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 2)
	g.release <- struct{}{}
	a.wait(t)
	want, _ := ctx2.Deadline()
	if s := g.next(t); s.deadline.IsZero() || s.deadline.Sub(want).Abs() > time.Second {
		t.Errorf("the RPC's deadline is %v, want %v", s.deadline, want)
	}
	b3, b4 := goEncrypt(ctx1, c, "t1", "3"), goEncrypt(t.Context(), c, "t1", "4")
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 2)
	g.release <- struct{}{}
	if s := g.next(t); !s.deadline.IsZero() {
		t.Errorf("the RPC has a deadline (%v), but one caller has none", s.deadline)
	}
	close(g.release)
	for _, b := range []*call{b1, b2, b3, b4} {
		if b.wait(t); b.err != nil {
			t.Error(b.err)
		}
	}
}

// TestAutoBatchMetadataAlone: a call with outgoing metadata is sent at
// once and alone, with its metadata.
func TestAutoBatchMetadataAlone(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	blockOne(t, g, c)
	queued := goEncrypt(t.Context(), c, "t1", "q")
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 1)
	m := goEncrypt(metadata.AppendToOutgoingContext(t.Context(), "x-trace", "42"), c, "t1", "m")
	if s := g.next(t); s.items != 1 || fmt.Sprint(s.md.Get("x-trace")) != "[42]" {
		t.Errorf("the call with metadata came as %+v", s)
	}
	close(g.release)
	for _, cl := range []*call{queued, m} {
		if cl.wait(t); cl.err != nil {
			t.Error(cl.err)
		}
	}
}

// TestAutoBatchMaxItems: a full batch is sent at once, even with
// MaxInFlight RPCs in flight.
func TestAutoBatchMaxItems(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour, MaxItems: 3})
	blockOne(t, g, c)
	var calls []*call
	for i := range 7 {
		calls = append(calls, goEncrypt(t.Context(), c, "t1", fmt.Sprint(i)))
	}
	if s1, s2 := g.next(t), g.next(t); s1.items != 3 || s2.items != 3 {
		t.Errorf("full batches of %d and %d items, want 3", s1.items, s2.items)
	}
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 1)
	close(g.release)
	for _, cl := range calls {
		if cl.wait(t); cl.err != nil {
			t.Error(cl.err)
		}
	}
	if s := g.next(t); s.items != 1 {
		t.Errorf("the last batch has %d items, want 1", s.items)
	}
}

// TestAutoBatchMaxBytes: a batch is sent when the next item would take it
// over MaxBytes.
func TestAutoBatchMaxBytes(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour, MaxBytes: len("t1") + 2*(100+itemOverhead)})
	blockOne(t, g, c)
	for i := range 3 {
		goEncrypt(t.Context(), c, "t1", strings.Repeat(fmt.Sprint(i), 100))
	}
	if s := g.next(t); s.items != 2 {
		t.Errorf("a batch of %d items, want 2", s.items)
	}
	close(g.release)
}

// TestAutoBatchLinger: a queued call waits MaxLinger at most, even while
// MaxInFlight RPCs are in flight.
func TestAutoBatchLinger(t *testing.T) {
	const linger = 30 * time.Millisecond
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: linger})
	blockOne(t, g, c)
	start := time.Now()
	b := goEncrypt(t.Context(), c, "t1", "b")
	if s := g.next(t); s.items != 1 {
		t.Fatalf("a batch of %d items", s.items)
	}
	if d := time.Since(start); d < linger-5*time.Millisecond {
		t.Errorf("the queued call was sent after %v, before MaxLinger %v", d, linger)
	}
	close(g.release)
	if b.wait(t); b.err != nil {
		t.Error(b.err)
	}
}

// TestAutoBatchClose: Close sends the queued calls at once, waits for
// them, and leaves no goroutine behind; later calls fail with Canceled.
func TestAutoBatchClose(t *testing.T) {
	g, c := dialGated(t, AutoBatchOptions{MaxInFlight: 1, MaxLinger: time.Hour})
	a := blockOne(t, g, c)
	var bs []*call
	for i := range 5 {
		bs = append(bs, goEncrypt(t.Context(), c, "t1", fmt.Sprint(i)))
	}
	waitQueued(t, c, batchKey{opEncrypt, "t1"}, 5)
	closed := make(chan error)
	go func() { closed <- c.Close() }()
	if s := g.next(t); s.items != 5 {
		t.Fatalf("Close sent a batch of %d items, want 5", s.items)
	}
	select {
	case <-closed:
		t.Fatal("Close returned before the calls it drains")
	case <-time.After(20 * time.Millisecond):
	}
	close(g.release)
	for i, b := range append(bs, a) {
		if b.wait(t); b.err != nil {
			t.Errorf("call %d: %v", i, b.err)
		}
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if _, err := c.EncryptOne(t.Context(), "t1", Item{Plaintext: []byte("late")}); status.Code(err) != codes.Canceled {
		t.Errorf("EncryptOne after Close: %v, want Canceled", err)
	}
}

// TestAutoBatchStress mixes many goroutines, two tenants, both methods and
// contexts that end at random moments, then checks every answer and that
// Close leaves no goroutine.
func TestAutoBatchStress(t *testing.T) {
	before := runtime.NumGoroutine()
	g, c := dialGated(t, AutoBatchOptions{MaxItems: 7})
	close(g.release)
	var wg sync.WaitGroup
	var ok, left atomic.Int64
	for i := range 64 {
		wg.Go(func() {
			tenant := []string{"t1", "t2"}[i%2]
			for j := range 200 {
				ctx, cancel := context.WithCancel(t.Context())
				if j%4 != 0 { // the others have no deadline
					ctx, cancel = context.WithTimeout(t.Context(), time.Duration(rand.IntN(3000))*time.Microsecond)
				}
				pt := fmt.Sprint(i, "/", j)
				out, err := c.EncryptOne(ctx, tenant, Item{Plaintext: []byte(pt)})
				if err == nil {
					out, err = c.DecryptOne(ctx, tenant, CiphertextItem{Ciphertext: out})
				}
				cancel()
				switch {
				case err == nil && string(out) == pt:
					ok.Add(1)
				case err == nil:
					t.Errorf("%s came back as %q", pt, out)
				case errors.Is(err, context.DeadlineExceeded) && status.Code(err) == codes.DeadlineExceeded:
					left.Add(1)
				default:
					t.Errorf("%s: %v", pt, err)
				}
			}
		})
	}
	wg.Wait()
	t.Logf("%d round trips, %d left on their deadline", ok.Load(), left.Load())
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	b := c.one.(*batcher)
	b.mu.Lock()
	if len(b.queues) != 0 {
		t.Errorf("%d queues left after Close", len(b.queues))
	}
	b.mu.Unlock()
	checkGoroutines(t, before+8) // the fake server's own
}

// checkGoroutines waits for the goroutines to number at most n.
func checkGoroutines(t *testing.T, n int) {
	t.Helper()
	for start := time.Now(); runtime.NumGoroutine() > n; time.Sleep(10 * time.Millisecond) {
		if time.Since(start) > 5*time.Second {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines, want at most %d:\n%s", runtime.NumGoroutine(), n, buf[:runtime.Stack(buf, true)])
		}
	}
}

func TestAutoBatchOptionsInvalid(t *testing.T) {
	for _, o := range []AutoBatchOptions{{MaxItems: -1}, {MaxBytes: -1}, {MaxInFlight: -1}, {MaxLinger: -time.Second}} {
		if c, err := Dial(t.Context(), "unix:x.sock", WithAutoBatch(o)); err == nil {
			c.Close()
			t.Errorf("Dial accepted %+v", o)
		}
	}
}
