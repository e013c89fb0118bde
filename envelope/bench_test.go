package envelope_test

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"testing"
	"time"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
)

// BenchmarkSeal compares a batch seal of 1,000 items with raw AES-256-GCM
// Seal of the same items into preallocated buffers, in one run: the ratio
// of their MB/s is the envelope's overhead (target: at least 0.85).
// "-reuse" variants seal into buffers reused across iterations, as raw
// does; the others allocate their output, as Seal does. "engine" uses every
// core, "engine-1" one.
func BenchmarkSeal(b *testing.B) {
	for _, size := range []int{64, 1024, 16 << 10} {
		items := make([]envelope.Item, 1000)
		for i := range items {
			items[i].Plaintext = randBytes(size)
		}
		b.Run(fmt.Sprintf("%dB/raw", size), func(b *testing.B) { benchRawSeal(b, items) })
		for _, w := range []int{1, 0} {
			name := "engine-reuse"
			if w == 1 {
				name = "engine-1-reuse"
			}
			b.Run(fmt.Sprintf("%dB/%s", size, name), func(b *testing.B) { benchSealTo(b, items, w) })
		}
		for _, w := range []int{1, 0} {
			name := "engine"
			if w == 1 {
				name = "engine-1"
			}
			b.Run(fmt.Sprintf("%dB/%s", size, name), func(b *testing.B) {
				e := newEngine(b, newPRF(), func(c *envelope.Config) { c.Workers = w })
				a := ref("bench", 1)
				b.SetBytes(int64(size * len(items)))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := e.Seal(context.Background(), a, items); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// benchSealTo seals into buffers reused across iterations, as raw does.
func benchSealTo(b *testing.B, items []envelope.Item, workers int) {
	e := newEngine(b, newPRF(), func(c *envelope.Config) { c.Workers = workers })
	a := ref("bench", 1)
	slab, out := make([]byte, envelope.SealedSize(items)), make([][]byte, len(items))
	b.SetBytes(int64(len(items[0].Plaintext) * len(items)))
	b.ReportAllocs()
	for b.Loop() {
		if err := e.SealTo(context.Background(), a, items, slab, out); err != nil {
			b.Fatal(err)
		}
	}
}

func benchRawSeal(b *testing.B, items []envelope.Item) {
	block, _ := aes.NewCipher(randBytes(32))
	gcm, _ := cipher.NewGCM(block)
	nonce := randBytes(12)
	out := make([][]byte, len(items))
	total := 0
	for i := range items {
		out[i] = make([]byte, 0, len(items[i].Plaintext)+16)
		total += len(items[i].Plaintext)
	}
	b.SetBytes(int64(total))
	b.ReportAllocs()
	for b.Loop() {
		for i := range items {
			out[i] = gcm.Seal(out[i][:0], nonce, items[i].Plaintext, nil)
		}
	}
}

// BenchmarkOpen opens a batch of 1,000 items of one seed, with the key
// cached (the steady state), against raw AES-256-GCM Open.
func BenchmarkOpen(b *testing.B) {
	for _, size := range []int{64, 1024, 16 << 10} {
		items := make([]envelope.Item, 1000)
		for i := range items {
			items[i].Plaintext = randBytes(size)
		}
		b.Run(fmt.Sprintf("%dB/raw", size), func(b *testing.B) {
			block, _ := aes.NewCipher(randBytes(32))
			gcm, _ := cipher.NewGCM(block)
			nonce := randBytes(12)
			cts := make([][]byte, len(items))
			out := make([]byte, size)
			for i := range items {
				cts[i] = gcm.Seal(nil, nonce, items[i].Plaintext, nil)
			}
			b.SetBytes(int64(size * len(items)))
			b.ReportAllocs()
			for b.Loop() {
				for i := range cts {
					if _, err := gcm.Open(out[:0], nonce, cts[i], nil); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
		b.Run(fmt.Sprintf("%dB/engine", size), func(b *testing.B) {
			e := newEngine(b, newPRF(), nil)
			a := ref("bench", 1)
			sealed, err := e.Seal(context.Background(), a, items)
			if err != nil {
				b.Fatal(err)
			}
			in := make([]envelope.Ciphertext, len(sealed))
			for i := range sealed {
				in[i].Data = sealed[i]
			}
			r := resolver("", a)
			b.SetBytes(int64(size * len(items)))
			b.ReportAllocs()
			for b.Loop() {
				res := mustOpen(b, e, context.Background(), r, in)
				if res[0].Err != nil {
					b.Fatal(res[0].Err)
				}
			}
		})
	}
}

// BenchmarkSealRatio alternates, in every iteration, a raw crypto/cipher
// AES-256-GCM seal of 1,000 items into reused buffers (without AAD, and
// with an AAD as long as the engine's) and an engine seal of the same
// items on one worker, and reports raw time / engine time for each.
func BenchmarkSealRatio(b *testing.B) {
	a := ref("bench", 1)
	var hdr [wire.HeaderSize]byte
	sameAAD := wire.AppendAAD(nil, hdr[:], a.Tenant, nil)
	for _, size := range []int{1024, 16 << 10} {
		items := make([]envelope.Item, 1000)
		for i := range items {
			items[i].Plaintext = randBytes(size)
		}
		block, _ := aes.NewCipher(randBytes(32))
		gcm, _ := cipher.NewGCM(block)
		nonce := randBytes(12)
		raw := make([][]byte, len(items))
		for i := range raw {
			raw[i] = make([]byte, 0, size+16)
		}
		rawSeal := func(aad []byte) time.Duration {
			t0 := time.Now()
			for i := range items {
				raw[i] = gcm.Seal(raw[i][:0], nonce, items[i].Plaintext, aad)
			}
			return time.Since(t0)
		}
		for _, alloc := range []bool{false, true} {
			name := fmt.Sprintf("%dB/reuse", size)
			if alloc {
				name = fmt.Sprintf("%dB/alloc", size)
			}
			b.Run(name, func(b *testing.B) {
				e := newEngine(b, newPRF(), func(c *envelope.Config) { c.Workers = 1 })
				slab, out := make([]byte, envelope.SealedSize(items)), make([][]byte, len(items))
				var rawT, rawAADT, engT time.Duration
				b.ReportAllocs()
				for b.Loop() {
					rawT += rawSeal(nil)
					rawAADT += rawSeal(sameAAD)
					t0 := time.Now()
					var err error
					if alloc {
						_, err = e.Seal(context.Background(), a, items)
					} else {
						err = e.SealTo(context.Background(), a, items, slab, out)
					}
					if err != nil {
						b.Fatal(err)
					}
					engT += time.Since(t0)
				}
				b.ReportMetric(float64(rawT)/float64(engT), "ratio")
				b.ReportMetric(float64(rawAADT)/float64(engT), "ratio-same-aad")
			})
		}
	}
}
