package tpm_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/hsmd/hsmd/tpm"
)

const latencyRuns = 20

// testLatency measures and logs the median latency of Seal, Unseal and
// IncrementCounter; it fails only if an operation fails.
func testLatency(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	ctx := context.Background()
	secret := make([]byte, 32)
	blob, err := tp.Seal(ctx, secret)
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.DefineCounter(ctx); err != nil {
		t.Fatal(err)
	}
	seal := median(t, func() error { _, err := tp.Seal(ctx, secret); return err })
	unseal := median(t, func() error { _, err := tp.Unseal(ctx, blob); return err })
	inc := median(t, func() error { _, err := tp.IncrementCounter(ctx); return err })
	t.Logf("%s: median of %d: seal %v, unseal %v, increment %v", c.Provider, latencyRuns, seal, unseal, inc)
}

func median(t *testing.T, op func() error) time.Duration {
	t.Helper()
	d := make([]time.Duration, latencyRuns)
	for i := range d {
		start := time.Now()
		if err := op(); err != nil {
			t.Fatal(err)
		}
		d[i] = time.Since(start)
	}
	slices.Sort(d)
	return d[len(d)/2]
}
