package bench

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// RawAESGCM measures AES-256-GCM in this process for about d: Seal (op
// encrypt) or Open (op decrypt) of size-byte items into reused buffers,
// from workers goroutines at once, without AAD. It returns MB/s of
// plaintext: the line hsmd's throughput is drawn against.
func RawAESGCM(op string, size, workers int, d time.Duration) float64 {
	key := make([]byte, 32)
	rand.Read(key)
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(block)
	var bytes atomic.Int64
	deadline := time.Now().Add(d)
	start := time.Now()
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Go(func() {
			nonce := make([]byte, aead.NonceSize())
			pt := make([]byte, size)
			rand.Read(pt)
			ct := aead.Seal(nil, nonce, pt, nil)
			out := make([]byte, 0, size+aead.Overhead())
			var n int64
			for i := 0; ; i++ {
				if i%16 == 0 && time.Now().After(deadline) {
					break
				}
				if op == OpDecrypt {
					if _, err := aead.Open(out[:0], nonce, ct, nil); err != nil {
						panic(err) // cannot happen: ct is its own
					}
				} else {
					out = aead.Seal(out[:0], nonce, pt, nil)
				}
				n += int64(size)
			}
			bytes.Add(n)
		})
	}
	wg.Wait()
	return float64(bytes.Load()) / time.Since(start).Seconds() / 1e6
}

// ParseSize reads a size such as 64, 1KiB, 16k or 1MiB (binary units).
func ParseSize(s string) (int, error) {
	t := strings.TrimSpace(strings.ToLower(s))
	mult := 1
	for _, u := range []struct {
		suffix string
		m      int
	}{{"kib", 1 << 10}, {"mib", 1 << 20}, {"kb", 1 << 10}, {"mb", 1 << 20}, {"k", 1 << 10}, {"m", 1 << 20}, {"b", 1}} {
		if v, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = v, u.m
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(t))
	if err != nil || n < 0 || n > (1<<31)/mult {
		return 0, fmt.Errorf("bench: size %q: want a number of bytes, optionally with KiB or MiB", s)
	}
	return n * mult, nil
}

// SizeString writes n as ParseSize reads it: 64B, 1KiB, 1MiB.
func SizeString(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}
