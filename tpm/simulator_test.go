package tpm_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/hsmd/hsmd/tpm"
)

// Simulator tests never run in parallel: there is one simulator per process.

func TestSimulatorOtherSeedRefused(t *testing.T) {
	tp := openTPM(t, simConfig(t)) // the simulator now runs with simSeed
	c := simConfig(t)
	c.SimulatorSeed = simSeed + 1
	if other, err := tpm.Open(context.Background(), c); err == nil {
		other.Close()
		t.Fatal("Open with another seed succeeded while the simulator runs")
	} else if errors.Is(err, tpm.ErrUnavailable) {
		t.Fatalf("Open with another seed = %v; want a configuration error, not ErrUnavailable", err)
	}
	if err := tp.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestSimulatorSharedAcrossValues checks that two TPM values share the one
// simulator: a blob sealed by one unseals with the other, and closing one
// leaves the other (and the simulator's NV memory) working.
func TestSimulatorSharedAcrossValues(t *testing.T) {
	c := simConfig(t)
	a := openTPM(t, c)
	b := openTPM(t, c)
	ctx := context.Background()
	blob, err := a.Seal(ctx, []byte("shared"))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.DefineCounter(ctx); err != nil {
		t.Fatal(err)
	}
	checkedClose(t, a)
	if got, err := b.Unseal(ctx, blob); err != nil || !bytes.Equal(got, []byte("shared")) {
		t.Fatalf("Unseal on the second value: %v", err)
	}
	if _, err := b.ReadCounter(ctx); err != nil {
		t.Fatalf("ReadCounter on the second value: %v", err)
	}
}
