package bench

import (
	"math"
	"math/bits"
	"time"
)

// histSub is the number of buckets per power of two: 64 keep every
// recorded latency within 1.6% of its bucket's representative value.
const histSub = 64

// Histogram counts latencies in log-linear buckets (HDR-style): fixed
// memory, no allocation per sample, within 1.6% everywhere from 1 ns to
// hours. The zero value is empty and ready.
type Histogram struct {
	counts [64 * histSub]uint64
	n      uint64
	max    time.Duration
}

func bucket(d time.Duration) int {
	v := uint64(max(d, 1))
	e := bits.Len64(v) - 1 // v in [2^e, 2^(e+1))
	if e < 6 {
		return int(v) // exact below 64 ns
	}
	frac := (v >> (e - 6)) & (histSub - 1) // the 6 bits after the leading one
	return e*histSub + int(frac)
}

// value is a representative latency of bucket i (its midpoint).
func value(i int) time.Duration {
	if i < histSub {
		return time.Duration(i)
	}
	e, frac := i/histSub, i%histSub
	lo := (uint64(histSub) + uint64(frac)) << (e - 6)
	return time.Duration(lo + (uint64(1)<<(e-6))/2)
}

// Record adds one latency.
func (h *Histogram) Record(d time.Duration) {
	h.counts[bucket(d)]++
	h.n++
	h.max = max(h.max, d)
}

// Merge adds o's samples to h.
func (h *Histogram) Merge(o *Histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// Count is the number of samples.
func (h *Histogram) Count() uint64 { return h.n }

// Quantile returns the latency below which a fraction q of the samples
// lie (q in [0, 1]), or 0 for an empty histogram.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		if seen += c; seen >= rank {
			return min(value(i), h.max)
		}
	}
	return h.max
}
