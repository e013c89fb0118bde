package envelope_test

import (
	"bytes"
	"context"
	"crypto/hpke"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
)

// staticXWing is an XWingKeys holding private keys in memory, counting
// its calls.
type staticXWing struct {
	keys  map[[2]uint64]hpke.PrivateKey
	calls atomic.Int64
}

func (s *staticXWing) XWingKey(_ context.Context, r envelope.KeyRef) (hpke.PrivateKey, error) {
	s.calls.Add(1)
	k, ok := s.keys[[2]uint64{r.TenantID, uint64(r.Version)}]
	if !ok {
		return nil, envelope.ErrUnknownKey
	}
	return k, nil
}

func newXWing(t testing.TB, refs ...envelope.KeyRef) *staticXWing {
	t.Helper()
	s := &staticXWing{keys: map[[2]uint64]hpke.PrivateKey{}}
	kem, _, _ := envelope.XWingSuite()
	for _, r := range refs {
		k, err := kem.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		s.keys[[2]uint64{r.TenantID, uint64(r.Version)}] = k
	}
	return s
}

func (s *staticXWing) seal(t testing.TB, r envelope.KeyRef, pt string, ctx map[string]string) []byte {
	t.Helper()
	ct, err := envelope.SealXWing(s.keys[[2]uint64{r.TenantID, uint64(r.Version)}].PublicKey(), r.Tenant, r.TenantID, r.Version, []byte(pt), ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

func TestXWingOpen(t *testing.T) {
	a, b := ref("acme", 1), ref("globex", 2)
	a2 := a
	a2.Version = 2
	xw := newXWing(t, a, a2, b)
	e := newEngine(t, newPRF(), func(c *envelope.Config) { c.XWing = xw })
	ctx := context.Background()
	row := map[string]string{"row": "1"}
	ct := xw.seal(t, a, "hello", row)
	if len(ct) != wire.XWingOverhead+5 {
		t.Fatalf("%d bytes", len(ct))
	}
	sym, err := e.Seal(ctx, a, []envelope.Item{{Plaintext: []byte("sym"), Context: row}})
	if err != nil {
		t.Fatal(err)
	}
	otherVersion := bytes.Clone(ct)
	otherVersion[13] = 2
	otherTenant := xw.seal(t, b, "hello", row)
	copy(otherTenant[2:10], ct[2:10])
	items := []envelope.Ciphertext{
		{Data: ct, Context: row},
		{Data: sym[0], Context: row},
		{Data: []byte(wire.EncodeText(ct)), Context: row},
		{Data: ct, Context: map[string]string{"row": "2"}},
		{Data: otherVersion, Context: row},
		{Data: otherTenant, Context: row},
		{Data: ct[:len(ct)-1], Context: row},
		{Data: ct[:wire.XWingOverhead-1], Context: row},
	}
	res := mustOpen(t, e, ctx, resolver("", a, a2, b), items)
	for i, want := range []string{"hello", "sym", "hello"} {
		if res[i].Err != nil || string(res[i].Plaintext) != want {
			t.Fatalf("item %d: %q %v", i, res[i].Plaintext, res[i].Err)
		}
	}
	for i := 3; i < 7; i++ {
		if res[i].Err != envelope.ErrDecrypt {
			t.Errorf("item %d: %v, want exactly ErrDecrypt", i, res[i].Err)
		}
	}
	if !errors.Is(res[7].Err, envelope.ErrMalformed) {
		t.Errorf("short item: %v", res[7].Err)
	}
	// The request names another tenant.
	if r := mustOpen(t, e, ctx, resolver("globex", a, b), items[:1]); r[0].Err != envelope.ErrDecrypt {
		t.Errorf("other tenant named: %v", r[0].Err)
	}
	// One key fetch per version, then the cache; Forget drops it.
	if n := xw.calls.Load(); n != 2 {
		t.Errorf("%d key fetches, want 2 (acme v1, v2)", n)
	}
	mustOpen(t, e, ctx, resolver("", a), items[:1])
	if st := e.Stats(); st.XWingHits == 0 || xw.calls.Load() != 2 {
		t.Errorf("cache not used: %+v, %d fetches", st, xw.calls.Load())
	}
	e.Forget(a.TenantID, a.Version)
	mustOpen(t, e, ctx, resolver("", a), items[:1])
	if xw.calls.Load() != 3 {
		t.Errorf("Forget kept the key: %d fetches", xw.calls.Load())
	}
	// Without XWingKeys, or for a version without a pair: ErrDecrypt.
	plain := newEngine(t, newPRF(), nil)
	if r := mustOpen(t, plain, ctx, resolver("", a), items[:1]); r[0].Err != envelope.ErrDecrypt {
		t.Errorf("no XWingKeys: %v", r[0].Err)
	}
	other := newEngine(t, newPRF(), func(c *envelope.Config) { c.XWing = newXWing(t) })
	if r := mustOpen(t, other, ctx, resolver("", a), items[:1]); r[0].Err != envelope.ErrDecrypt {
		t.Errorf("no key pair: %v", r[0].Err)
	}
}

// TestXWingEveryBitFlip: flipping any single bit of a suite 0x02
// ciphertext makes it malformed (bytes 0-1) or ErrDecrypt (anywhere else).
func TestXWingEveryBitFlip(t *testing.T) {
	a := ref("acme", 1)
	xw := newXWing(t, a)
	e := newEngine(t, newPRF(), func(c *envelope.Config) { c.XWing = xw })
	ct := xw.seal(t, a, "hello", nil)
	var items []envelope.Ciphertext
	for i := range ct {
		for bit := range 8 {
			if i >= 14 && i < wire.XWingHeaderSize && (bit != 0 || i%7 != 0) {
				continue // sample the encapsulation: X-Wing decapsulation is slow
			}
			c := bytes.Clone(ct)
			c[i] ^= 1 << bit
			items = append(items, envelope.Ciphertext{Data: c})
		}
	}
	res := mustOpen(t, e, context.Background(), resolver("", a), items)
	for i, r := range res {
		switch {
		case r.Plaintext != nil && r.Err == nil:
			t.Fatalf("item %d opened", i)
		case errors.Is(r.Err, envelope.ErrMalformed):
			if d := firstDiff(items[i].Data, ct); d > 1 {
				t.Fatalf("flip at byte %d malformed", d)
			}
		case r.Err != envelope.ErrDecrypt:
			t.Fatalf("item %d: %v", i, r.Err)
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func TestSealXWingRefuses(t *testing.T) {
	a := ref("acme", 1)
	xw := newXWing(t, a)
	pub := xw.keys[[2]uint64{a.TenantID, 1}].PublicKey()
	for name, f := range map[string]func() error{
		"empty tenant": func() error { _, err := envelope.SealXWing(pub, "", 1, 1, nil, nil); return err },
		"zero id":      func() error { _, err := envelope.SealXWing(pub, "a", 0, 1, nil, nil); return err },
		"zero version": func() error { _, err := envelope.SealXWing(pub, "a", 1, 0, nil, nil); return err },
		"nil key":      func() error { _, err := envelope.SealXWing(nil, "a", 1, 1, nil, nil); return err },
	} {
		if f() == nil {
			t.Errorf("%s: sealed", name)
		}
	}
}

// BenchmarkXWing: the cost of one offline seal (SealXWing) and one open
// (OpenXWing), and a batch of 100 items opened by the Engine under suite
// 0x02 beside the same batch under suite 0x01 (keys cached).
func BenchmarkXWing(b *testing.B) {
	a := ref("bench", 1)
	xw := newXWing(b, a)
	priv := xw.keys[[2]uint64{a.TenantID, 1}]
	pt := randBytes(64)
	ctx := map[string]string{"row": "1"}
	b.Run("seal-64B", func(b *testing.B) {
		for b.Loop() {
			if _, err := envelope.SealXWing(priv.PublicKey(), a.Tenant, a.TenantID, a.Version, pt, ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	ct := xw.seal(b, a, string(pt), ctx)
	b.Run("open-64B", func(b *testing.B) {
		for b.Loop() {
			if _, err := envelope.OpenXWing(priv, a.Tenant, ct, ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, workers := range []int{1, 0} {
		e := newEngine(b, newPRF(), func(c *envelope.Config) { c.XWing = xw; c.Workers = workers })
		sym, err := e.Seal(context.Background(), a, repeatItems(envelope.Item{Plaintext: pt, Context: ctx}, 100))
		if err != nil {
			b.Fatal(err)
		}
		batches := map[string][]envelope.Ciphertext{"suite1": nil, "xwing": nil}
		for i := range 100 {
			batches["suite1"] = append(batches["suite1"], envelope.Ciphertext{Data: sym[i], Context: ctx})
			batches["xwing"] = append(batches["xwing"], envelope.Ciphertext{Data: xw.seal(b, a, string(pt), ctx), Context: ctx})
		}
		for _, name := range []string{"suite1", "xwing"} {
			b.Run(fmt.Sprintf("open-batch100-64B/%s/workers=%d", name, workers), func(b *testing.B) {
				for b.Loop() {
					res, err := e.Open(context.Background(), resolver("", a), batches[name])
					if err != nil || res[99].Err != nil {
						b.Fatal(err, res[99].Err)
					}
				}
			})
		}
	}
}

func repeatItems(it envelope.Item, n int) []envelope.Item {
	out := make([]envelope.Item, n)
	for i := range out {
		out[i] = it
	}
	return out
}
