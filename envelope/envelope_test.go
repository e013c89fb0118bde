package envelope_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/internal/softprf"
	"github.com/hsmd/hsmd/envelope/wire"
)

func newPRF() *softprf.PRF {
	return softprf.New(map[uint32][]byte{1: bytes.Repeat([]byte{0x42}, 32), 2: bytes.Repeat([]byte{0x43}, 32)})
}

func newEngine(t testing.TB, prf envelope.Deriver, mod func(*envelope.Config)) *envelope.Engine {
	t.Helper()
	cfg := envelope.Config{Deriver: prf}
	if mod != nil {
		mod(&cfg)
	}
	e, err := envelope.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func ref(tenant string, id uint64) envelope.KeyRef {
	r := envelope.KeyRef{Tenant: tenant, TenantID: id, Version: 1, KDKVersion: 1}
	copy(r.Salt[:], fmt.Sprintf("salt-of-%-24s", tenant))
	return r
}

// resolver knows the given refs; a non-empty only restricts it to one
// tenant, as a request naming its tenant does.
func resolver(only string, refs ...envelope.KeyRef) envelope.Resolver {
	return func(_ context.Context, id uint64, v uint32) (envelope.KeyRef, error) {
		for _, r := range refs {
			if r.TenantID == id && r.Version == v && (only == "" || only == r.Tenant) {
				return r, nil
			}
		}
		return envelope.KeyRef{}, envelope.ErrUnknownKey
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestRoundTripSizes(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, nil)
	a := ref("tenant-a", 7)
	ctx := context.Background()
	for _, n := range []int{0, 1, 1024, 1 << 20} {
		pt := randBytes(n)
		items := []envelope.Item{{Plaintext: pt, Context: map[string]string{"table": "users"}}}
		cts, err := e.Seal(ctx, a, items)
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if len(cts[0]) != n+wire.Overhead {
			t.Fatalf("%d bytes: ciphertext is %d bytes, want %d", n, len(cts[0]), n+wire.Overhead)
		}
		res := mustOpen(t, e, ctx, resolver("", a), []envelope.Ciphertext{{Data: cts[0], Context: items[0].Context}})
		if res[0].Err != nil || !bytes.Equal(res[0].Plaintext, pt) {
			t.Fatalf("%d bytes: open: %v", n, res[0].Err)
		}
	}
}

func TestBatchOf10000(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, func(c *envelope.Config) { c.ParallelMinBytes = 1 })
	a := ref("tenant-a", 7)
	ctx := context.Background()
	items := make([]envelope.Item, 10000)
	for i := range items {
		items[i].Plaintext = []byte(fmt.Sprintf("record %d", i))
		if i%3 == 0 {
			items[i].Context = map[string]string{"row": fmt.Sprint(i), "db": "x"}
		}
	}
	cts, err := e.Seal(ctx, a, items)
	if err != nil {
		t.Fatal(err)
	}
	in := make([]envelope.Ciphertext, len(cts))
	for i := range cts {
		in[i] = envelope.Ciphertext{Data: cts[i], Context: items[i].Context}
	}
	// A fresh engine must derive again: once for the whole batch.
	e2 := newEngine(t, prf, func(c *envelope.Config) { c.ParallelMinBytes = 1 })
	before := prf.Calls()
	res := mustOpen(t, e2, ctx, resolver("", a), in)
	if got := prf.Calls() - before; got != 1 {
		t.Errorf("opening one batch cost %d PRF calls, want 1", got)
	}
	for i := range res {
		if res[i].Err != nil || !bytes.Equal(res[i].Plaintext, items[i].Plaintext) {
			t.Fatalf("item %d: %v", i, res[i].Err)
		}
	}
	nonces := map[string]bool{}
	for _, ct := range cts {
		h, _, _ := wire.Parse(ct)
		if nonces[string(h.Nonce[:])] {
			t.Fatal("repeated nonce")
		}
		nonces[string(h.Nonce[:])] = true
	}
}

// TestAuthFailures: another tenant, another context and every single-bit flip
// fail that item alone, with one error; the other items still open.
func TestAuthFailures(t *testing.T) {
	e := newEngine(t, newPRF(), nil)
	a, b := ref("tenant-a", 7), ref("tenant-b", 8)
	ctx := context.Background()
	c := map[string]string{"k": "v"}
	ctsA, err := e.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("hi"), Context: c}, {Plaintext: []byte("good")}})
	if err != nil {
		t.Fatal(err)
	}
	ctsB, err := e.Seal(ctx, b, []envelope.Item{{Plaintext: []byte("good")}})
	if err != nil {
		t.Fatal(err)
	}
	good := envelope.Ciphertext{Data: ctsA[1]}
	check := func(name string, bad envelope.Ciphertext, r envelope.Resolver, want error) {
		t.Helper()
		good := good
		if name == "as tenant b" {
			good = envelope.Ciphertext{Data: ctsB[0]}
		}
		res := mustOpen(t, e, ctx, r, []envelope.Ciphertext{good, bad, good})
		if !errors.Is(res[1].Err, want) {
			t.Errorf("%s: got %v, want %v", name, res[1].Err, want)
		}
		if want != nil && res[1].Plaintext != nil {
			t.Errorf("%s: failed item has a plaintext", name)
		}
		for _, i := range []int{0, 2} {
			if res[i].Err != nil || string(res[i].Plaintext) != "good" {
				t.Errorf("%s: good item %d: %v", name, i, res[i].Err)
			}
		}
	}
	both := resolver("", a, b)
	check("as tenant b", envelope.Ciphertext{Data: ctsA[0], Context: c}, resolver("tenant-b", a, b), envelope.ErrDecrypt)
	check("other context", envelope.Ciphertext{Data: ctsA[0], Context: map[string]string{"k": "w"}}, both, envelope.ErrDecrypt)
	check("no context", envelope.Ciphertext{Data: ctsA[0]}, both, envelope.ErrDecrypt)
	check("truncated", envelope.Ciphertext{Data: ctsA[0][:len(ctsA[0])-1], Context: c}, both, envelope.ErrDecrypt)
	check("truncated header", envelope.Ciphertext{Data: ctsA[0][:wire.Overhead-1], Context: c}, both, envelope.ErrMalformed)
	check("extended", envelope.Ciphertext{Data: append(bytes.Clone(ctsA[0]), 0), Context: c}, both, envelope.ErrDecrypt)
	check("garbage", envelope.Ciphertext{Data: []byte("not a ciphertext")}, both, envelope.ErrMalformed)
	check("bad text", envelope.Ciphertext{Data: []byte("hsmd:v1:!!!")}, both, envelope.ErrMalformed)
	for bit := 0; bit < len(ctsA[0])*8; bit++ {
		flipped := bytes.Clone(ctsA[0])
		flipped[bit/8] ^= 1 << (bit % 8)
		want := envelope.ErrDecrypt
		if bit/8 < 2 { // version and suite: structure, not a ciphertext
			want = envelope.ErrMalformed
		}
		check(fmt.Sprintf("bit %d", bit), envelope.Ciphertext{Data: flipped, Context: c}, both, want)
	}
	// The untouched ciphertext still opens: nothing above changed it.
	check("control", envelope.Ciphertext{Data: ctsA[1]}, both, nil)
}

func TestTextForm(t *testing.T) {
	e := newEngine(t, newPRF(), nil)
	a := ref("t", 1)
	cts, err := e.Seal(context.Background(), a, []envelope.Item{{Plaintext: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	text := " " + wire.EncodeText(cts[0]) + "\n"
	res := mustOpen(t, e, context.Background(), resolver("", a), []envelope.Ciphertext{{Data: []byte(text)}})
	if res[0].Err != nil || string(res[0].Plaintext) != "x" {
		t.Fatalf("text form: %v", res[0].Err)
	}
}

func TestSealReusesSeedWithinLimits(t *testing.T) {
	prf := newPRF()
	now := time.Unix(1_800_000_000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	e := newEngine(t, prf, func(c *envelope.Config) {
		c.Limits = envelope.Limits{MaxItems: 1000, MaxBytes: 1 << 20, MaxAge: time.Minute}
		c.Now = clock
	})
	a := ref("t", 1)
	ctx := context.Background()
	seal := func(n, size int) wire.Header {
		t.Helper()
		items := make([]envelope.Item, n)
		for i := range items {
			items[i].Plaintext = make([]byte, size)
		}
		cts, err := e.Seal(ctx, a, items)
		if err != nil {
			t.Fatal(err)
		}
		h, _, _ := wire.Parse(cts[0])
		return h
	}
	h1 := seal(600, 1)
	if h2 := seal(400, 1); h2.Seed != h1.Seed || prf.Calls() != 1 {
		t.Fatalf("within the item limit: new seed or %d calls", prf.Calls())
	}
	h3 := seal(1, 1) // 1001st item
	if h3.Seed == h1.Seed || prf.Calls() != 2 {
		t.Fatalf("past the item limit: seed reused or %d calls", prf.Calls())
	}
	h4 := seal(1, 1<<20) // over the byte limit together with h3's byte
	if h4.Seed == h3.Seed {
		t.Fatal("past the byte limit: seed reused")
	}
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	if h5 := seal(1, 1); h5.Seed == h4.Seed {
		t.Fatal("past the age limit: seed reused")
	}
	if _, err := e.Seal(ctx, a, make([]envelope.Item, 1001)); err == nil {
		t.Fatal("a batch over the per-key item limit was sealed")
	}
}

func TestHundredThousandItemsOneDerivation(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, nil)
	a := ref("t", 1)
	items := make([]envelope.Item, 1000)
	for i := range items {
		items[i].Plaintext = []byte("payload")
	}
	for range 100 {
		if _, err := e.Seal(context.Background(), a, items); err != nil {
			t.Fatal(err)
		}
	}
	if got := prf.Calls(); got != 1 {
		t.Fatalf("100,000 items cost %d derivations, want 1", got)
	}
	if s := e.Stats(); s.SealMisses != 1 || s.SealHits != 99 {
		t.Fatalf("stats %+v", s)
	}
}

func TestDeriveFailure(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, nil)
	a := ref("t", 1)
	ctx := context.Background()
	cts, err := e.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	down := errors.New("hsm down")
	prf.FailWith(down)
	e2 := newEngine(t, prf, nil) // cold cache
	if _, err := e2.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("x")}}); !errors.Is(err, envelope.ErrDerive) || !errors.Is(err, down) {
		t.Fatalf("seal with the deriver down: %v", err)
	}
	res := mustOpen(t, e2, ctx, resolver("", a), []envelope.Ciphertext{{Data: cts[0]}})
	if !errors.Is(res[0].Err, envelope.ErrDerive) {
		t.Fatalf("open with the deriver down: %v", res[0].Err)
	}
	// The warm engine keeps serving from its cache.
	if res := mustOpen(t, e, ctx, resolver("", a), []envelope.Ciphertext{{Data: cts[0]}}); res[0].Err != nil {
		t.Fatalf("cached key: %v", res[0].Err)
	}
	prf.FailWith(nil)
	if res := mustOpen(t, e2, ctx, resolver("", a), []envelope.Ciphertext{{Data: cts[0]}}); res[0].Err != nil {
		t.Fatalf("after recovery: %v", res[0].Err)
	}
}

func TestResolverErrorsPassThrough(t *testing.T) {
	e := newEngine(t, newPRF(), nil)
	a := ref("t", 1)
	cts, _ := e.Seal(context.Background(), a, []envelope.Item{{Plaintext: []byte("x")}})
	storeDown := errors.New("store unavailable")
	r := func(context.Context, uint64, uint32) (envelope.KeyRef, error) { return envelope.KeyRef{}, storeDown }
	if res := mustOpen(t, e, context.Background(), r, []envelope.Ciphertext{{Data: cts[0]}}); !errors.Is(res[0].Err, storeDown) {
		t.Fatalf("got %v", res[0].Err)
	}
}

func TestForgetDropsKeys(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, nil)
	a := ref("t", 1)
	ctx := context.Background()
	cts, _ := e.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("x")}})
	e.Forget(a.TenantID, a.Version)
	mustOpen(t, e, ctx, resolver("", a), []envelope.Ciphertext{{Data: cts[0]}})
	if _, err := e.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("x")}}); err != nil {
		t.Fatal(err)
	}
	if got := prf.Calls(); got != 3 {
		t.Fatalf("after Forget: %d derivations, want 3 (seal, open, seal)", got)
	}
}

func TestConcurrentUse(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, func(c *envelope.Config) {
		c.Limits.MaxItems = 50 // force seed turnover under contention
		c.ParallelMinBytes = 64
	})
	refs := []envelope.KeyRef{ref("a", 1), ref("b", 2), ref("c", 3)}
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := refs[g%len(refs)]
			for i := range 50 {
				items := []envelope.Item{{Plaintext: []byte(fmt.Sprint(g, i))}, {Plaintext: randBytes(100)}}
				cts, err := e.Seal(ctx, r, items)
				if err != nil {
					errs <- err
					return
				}
				res := mustOpen(t, e, ctx, resolver(r.Tenant, refs...), []envelope.Ciphertext{{Data: cts[0]}, {Data: cts[1]}})
				for j := range res {
					if res[j].Err != nil || !bytes.Equal(res[j].Plaintext, items[j].Plaintext) {
						errs <- fmt.Errorf("goroutine %d item %d: %v", g, i, res[j].Err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestCanceledContext(t *testing.T) {
	e := newEngine(t, newPRF(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.Seal(ctx, ref("t", 1), []envelope.Item{{}}); !errors.Is(err, context.Canceled) {
		t.Fatalf("seal: %v", err)
	}
	res := mustOpen(t, e, ctx, resolver(""), []envelope.Ciphertext{{Data: make([]byte, 100)}})
	if !errors.Is(res[0].Err, context.Canceled) {
		t.Fatalf("open: %v", res[0].Err)
	}
}

func mustOpen(t testing.TB, e *envelope.Engine, ctx context.Context, r envelope.Resolver, items []envelope.Ciphertext) []envelope.Opened {
	t.Helper()
	res, err := e.Open(ctx, r, items)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestForgedSeedsNeitherFlushNorFloodTheCache: items under made-up seeds
// cost one derivation each up to MaxGroups, are never cached, and a batch
// spanning more groups fails whole before any derivation.
func TestForgedSeedsNeitherFlushNorFloodTheCache(t *testing.T) {
	prf := newPRF()
	e := newEngine(t, prf, func(c *envelope.Config) { c.CacheSize = 8; c.MaxGroups = 20 })
	a := ref("t", 1)
	ctx := context.Background()
	genuine, err := e.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("x")}})
	if err != nil {
		t.Fatal(err)
	}
	forge := func(n int) []envelope.Ciphertext {
		var items []envelope.Ciphertext
		for range n {
			f := bytes.Clone(genuine[0])
			rand.Read(f[14:30]) // another seed
			items = append(items, envelope.Ciphertext{Data: f})
		}
		return items
	}
	before := prf.Calls()
	res := mustOpen(t, e, ctx, resolver("", a), forge(19))
	for i := range res {
		if res[i].Err != envelope.ErrDecrypt {
			t.Fatalf("forged item %d: %v", i, res[i].Err)
		}
	}
	if got := prf.Calls() - before; got != 19 {
		t.Fatalf("%d derivations for 19 forged seeds", got)
	}
	// The genuine key is still cached: no derivation to open it.
	before = prf.Calls()
	if res := mustOpen(t, e, ctx, resolver("", a), []envelope.Ciphertext{{Data: genuine[0]}}); res[0].Err != nil || prf.Calls() != before {
		t.Fatalf("genuine item after the forgeries: %v, %d derivations", res[0].Err, prf.Calls()-before)
	}
	before = prf.Calls()
	if _, err := e.Open(ctx, resolver("", a), forge(21)); !errors.Is(err, envelope.ErrTooManyGroups) {
		t.Fatalf("21 groups: %v", err)
	}
	if prf.Calls() != before {
		t.Fatal("a refused batch cost derivations")
	}
}

// TestSealWaitHonoursContext: a caller queued behind a slow derivation for
// the same tenant gives up at its own deadline.
func TestSealWaitHonoursContext(t *testing.T) {
	slow := &slowPRF{prf: newPRF(), started: make(chan struct{}), release: make(chan struct{})}
	e := newEngine(t, slow, nil)
	a := ref("t", 1)
	go e.Seal(context.Background(), a, []envelope.Item{{}}) // holds the tenant's lock while deriving
	<-slow.started
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := e.Seal(ctx, a, []envelope.Item{{}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("queued seal: %v", err)
	}
	close(slow.release)
}

type slowPRF struct {
	prf     *softprf.PRF
	once    sync.Once
	started chan struct{}
	release chan struct{}
}

func (s *slowPRF) PRF(ctx context.Context, v uint32, msg []byte) ([]byte, error) {
	s.once.Do(func() { close(s.started) })
	<-s.release
	return s.prf.PRF(ctx, v, msg)
}

func TestSealRefusesZeroIDs(t *testing.T) {
	e := newEngine(t, newPRF(), nil)
	for _, r := range []envelope.KeyRef{ref("t", 0), {Tenant: "t", TenantID: 1}} {
		if _, err := e.Seal(context.Background(), r, []envelope.Item{{}}); err == nil {
			t.Errorf("sealed under %+v", r)
		}
	}
}

// TestOpenInPlace: OpenInPlace answers as Open does, item by item, with
// each plaintext written over its own ciphertext, bad items included.
func TestOpenInPlace(t *testing.T) {
	e := newEngine(t, newPRF(), nil)
	a := ref("tenant-a", 7)
	ctx := context.Background()
	c := map[string]string{"k": "v"}
	items := []envelope.Item{{Plaintext: []byte("first")}, {Plaintext: randBytes(3000), Context: c}, {Plaintext: []byte{}}, {Plaintext: []byte("last")}}
	cts, err := e.Seal(ctx, a, items)
	if err != nil {
		t.Fatal(err)
	}
	forged := bytes.Clone(cts[3])
	forged[len(forged)-1] ^= 1
	text := []byte(wire.EncodeText(cts[0]))
	in := []envelope.Ciphertext{{Data: cts[0]}, {Data: cts[1], Context: c}, {Data: cts[2]}, {Data: forged}, {Data: text}, {Data: []byte("garbage")}}
	want := mustOpen(t, e, ctx, resolver("", a), in)
	own := make([]envelope.Ciphertext, len(in))
	for i := range in {
		own[i] = envelope.Ciphertext{Data: bytes.Clone(in[i].Data), Context: in[i].Context}
	}
	got, err := e.OpenInPlace(ctx, resolver("", a), own)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if fmt.Sprint(got[i].Err) != fmt.Sprint(want[i].Err) || !bytes.Equal(got[i].Plaintext, want[i].Plaintext) {
			t.Fatalf("item %d: OpenInPlace = %q, %v; Open = %q, %v", i, got[i].Plaintext, got[i].Err, want[i].Plaintext, want[i].Err)
		}
	}
	for _, i := range []int{0, 1} {
		if &got[i].Plaintext[0] != &own[i].Data[wire.HeaderSize] {
			t.Errorf("item %d: the plaintext is not written over the ciphertext", i)
		}
	}
	if got[3].Err == nil || got[5].Err == nil || !bytes.Equal(got[4].Plaintext, []byte("first")) {
		t.Fatalf("forged %v, garbage %v, text form %q", got[3].Err, got[5].Err, got[4].Plaintext)
	}
	if bytes.Equal(own[1].Data, cts[1]) {
		t.Error("the input was not overwritten")
	}
}
