//go:build cgo

package tpm

import (
	"context"
	"fmt"
	"sync"

	"github.com/google/go-tpm-tools/simulator"
)

// sim is the process's one go-tpm-tools simulator. It is created by the first
// Open with provider simulator and lives until the process exits: closing it
// would lose its NV memory (the rollback counter), which exists only in this
// process. Its hierarchy seeds come from Config.SimulatorSeed, so the SRK, and
// blobs sealed to it, are the same in every process started with that seed.
var sim struct {
	mu   sync.Mutex // guards s and seed
	s    *simulator.Simulator
	seed int64
	cmd  sync.Mutex // serialises commands of every TPM value using the simulator
}

// openSimulator returns the backend and the mutex that every TPM value on the
// simulator shares.
func openSimulator(seed int64) (backend, *sync.Mutex, error) {
	sim.mu.Lock()
	defer sim.mu.Unlock()
	if sim.s == nil {
		s, err := simulator.GetWithFixedSeedInsecure(seed)
		if err != nil {
			return nil, nil, fmt.Errorf("%w: starting the TPM simulator: %v", ErrUnavailable, err)
		}
		sim.s, sim.seed = s, seed
	} else if sim.seed != seed {
		return nil, nil, fmt.Errorf("tpm: the TPM simulator already runs in this process with another seed; " +
			"there is one simulator per process, so every Open must use the same SimulatorSeed")
	}
	return simBackend{}, &sim.cmd, nil
}

// simBackend runs commands on the process's simulator. Close releases nothing:
// the simulator stays alive for the process.
type simBackend struct{}

func (simBackend) generation() uint64 { return 1 }

func (simBackend) close() error { return nil }

func (simBackend) roundTrip(_ context.Context, cmd []byte) ([]byte, error) {
	if _, err := sim.s.Write(cmd); err != nil {
		return nil, fmt.Errorf("%w: simulator: %v", ErrUnavailable, err)
	}
	resp, _, err := readResponse(sim.s)
	if err != nil {
		return nil, fmt.Errorf("%w: simulator: %v", ErrUnavailable, err)
	}
	return resp, nil
}
