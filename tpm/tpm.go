// Package tpm seals hsmd's local secrets to a TPM 2.0 and keeps a rollback
// counter in the TPM's NV memory.
//
// # Providers
//
// A TPM is reached through one of three providers (Config.Provider):
//
//   - device: a kernel TPM device, /dev/tpmrm0 by default (production);
//   - swtpm: a swtpm server socket, unix or TCP (development, tests);
//   - simulator: the in-process go-tpm-tools simulator (development default).
//     It is insecure (its seeds come from Config.SimulatorSeed), needs cgo, and
//     exists once per process; see Open.
//
// # Sealing
//
// Seal stores up to MaxSecretSize bytes in a TPM sealed data object under the
// ECC storage root key (SRK) of the owner hierarchy, with a policy on the
// current SHA-256 values of Config.PCRs. The returned blob is opaque and not
// secret by itself: only the same TPM, with the same PCR values, unseals it.
//
// # Rollback counter
//
// DefineCounter, ReadCounter and IncrementCounter manage a TPM_NT_COUNTER NV
// index (Config.NVIndex): a 64-bit value the TPM only ever increases, which
// survives power cycles.
//
// # Errors
//
// Errors wrap the sentinels ErrTooLarge, ErrPCRMismatch, ErrWrongTPM,
// ErrCorrupt, ErrCounterExists, ErrNoCounter, ErrUnavailable and ErrClosed, or
// the context's error. They never contain a secret or a sealed blob.
//
// Secrets pass through Go memory that this package does not clear: erasure is
// best effort at most, and the caller owns the slices it passes and receives.
package tpm

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// TPM is an open TPM. It is safe for concurrent use: it owns one connection
// and runs one command at a time (TPM values on the simulator share one
// lock). Every operation flushes the transient objects and sessions it
// creates, even when it fails. The caller must Close it.
type TPM struct {
	cfg Config
	mu  *sync.Mutex // serialises operations; shared by all TPM values on the simulator

	// Guarded by mu.
	rw     *cmdRW
	closed bool
	dirty  bool // an operation failed mid-way: flush leftover handles before the next
}

// Open validates c, applies the defaults, connects to the TPM and flushes the
// transient objects and sessions left over by an earlier client (swtpm and
// the simulator have no resource manager).
//
// Provider "none" is an error: the caller decides what running without a TPM
// means. For provider simulator, the first Open in the process starts the
// simulator with c.SimulatorSeed; it then lives until the process exits, so
// that its NV memory survives a Close and a later Open. An Open with a
// different seed while it lives fails. Only one TPM value should be open per
// swtpm server: swtpm serves one connection at a time.
//
// Errors: a validation error, ErrUnavailable if the TPM cannot be reached,
// or the context's error.
func Open(ctx context.Context, c Config) (*TPM, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.Provider == ProviderNone {
		return nil, errors.New("tpm: provider none has no TPM to open")
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("tpm: open: %w", err)
	}
	c = c.withDefaults()
	b, mu, err := openBackend(ctx, c)
	if err != nil {
		return nil, err
	}
	t := &TPM{cfg: c, mu: mu, rw: &cmdRW{b: b}, dirty: true}
	if err := t.do(ctx, "open", func(io.ReadWriter) error { return nil }); err != nil {
		b.close()
		return nil, err
	}
	return t, nil
}

func openBackend(ctx context.Context, c Config) (backend, *sync.Mutex, error) {
	switch c.Provider {
	case ProviderDevice:
		b, err := newDevBackend(c.Device)
		return b, new(sync.Mutex), err
	case ProviderSwtpm:
		b, err := newSockBackend(ctx, c.Address)
		return b, new(sync.Mutex), err
	default:
		return openSimulator(c.SimulatorSeed)
	}
}

// do runs fn as the operation op, holding the lock, with ctx as the context
// of every command fn sends. A transport failure during fn (the TPM became
// unreachable, the context ended) replaces fn's error, since go-tpm does not
// always wrap it.
func (t *TPM) do(ctx context.Context, op string, fn func(rw io.ReadWriter) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("tpm: %s: %w", op, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return fmt.Errorf("tpm: %s: %w", op, ErrClosed)
	}
	t.rw.begin(ctx)
	defer t.rw.end()
	if t.dirty {
		if err := flushAll(t.rw); err != nil {
			return t.opError(op, err)
		}
		t.dirty = false
	}
	if err := fn(t.rw); err != nil {
		return t.opError(op, err)
	}
	return nil
}

func (t *TPM) opError(op string, err error) error {
	switch {
	case t.rw.failed != nil:
		t.dirty = true
		return fmt.Errorf("tpm: %s: %w", op, t.rw.failed)
	case t.rw.interrupted:
		t.dirty = true
		return fmt.Errorf("tpm: %s: %w: the connection was re-established during the operation "+
			"(did the TPM restart?); try again: %v", op, ErrUnavailable, err)
	}
	return fmt.Errorf("tpm: %s: %w", op, err)
}

// Close releases the connection (for the simulator: only this TPM value; the
// simulator lives on). It is safe to call more than once; later operations
// fail with ErrClosed.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	return t.rw.b.close()
}

// Info describes the TPM's configuration (defaults applied). It holds no secrets.
func (t *TPM) Info() Info {
	i := Info{Provider: t.cfg.Provider, PCRs: slices.Clone(t.cfg.PCRs), NVIndex: t.cfg.NVIndex}
	switch t.cfg.Provider {
	case ProviderDevice:
		i.Device = t.cfg.Device
	case ProviderSwtpm:
		i.Address = t.cfg.Address
	}
	return i
}

// Ping checks that the TPM answers (one TPM2_GetCapability). For swtpm it
// reconnects if the connection broke, so after the server comes back the
// next Ping succeeds. Errors: ErrUnavailable, ErrClosed, the context's error.
func (t *TPM) Ping(ctx context.Context) error {
	return t.do(ctx, "ping", func(rw io.ReadWriter) error {
		_, _, err := tpm2.GetCapability(rw, tpm2.CapabilityTPMProperties, 1, uint32(tpm2.Manufacturer))
		return err
	})
}

// TransientHandles returns the number of transient objects loaded in the
// TPM (with /dev/tpmrm0: those of this connection). It is 0 between
// operations unless someone else uses the TPM; tests use it to find leaks.
func (t *TPM) TransientHandles(ctx context.Context) (int, error) {
	var n int
	err := t.do(ctx, "list transient handles", func(rw io.ReadWriter) error {
		h, err := client.Handles(rw, tpm2.HandleTypeTransient)
		n = len(h)
		return err
	})
	return n, err
}

// ExtendPCR extends PCR pcr (SHA-256 bank) with SHA-256(data). It is meant
// for tests and tools: a PCR in the policy changes, so blobs sealed before no
// longer unseal (until the next power cycle resets the PCR). PCRs 17..22 need
// a locality this package does not use, and fail.
func (t *TPM) ExtendPCR(ctx context.Context, pcr int, data []byte) error {
	if pcr < 0 || pcr >= numPCRs {
		return fmt.Errorf("tpm: extend PCR: PCR %d is not in the range 0..23", pcr)
	}
	digest := sha256.Sum256(data)
	return t.do(ctx, fmt.Sprintf("extend PCR %d", pcr), func(rw io.ReadWriter) error {
		return tpm2.PCRExtend(rw, tpmutil.Handle(pcr), tpm2.AlgSHA256, digest[:], "")
	})
}

// flushAll flushes every transient object and loaded session.
func flushAll(rw io.ReadWriter) error {
	for _, ht := range []tpm2.HandleType{tpm2.HandleTypeTransient, tpm2.HandleTypeLoadedSession} {
		handles, err := client.Handles(rw, ht)
		if err != nil {
			return fmt.Errorf("listing handles: %w", err)
		}
		for _, h := range handles {
			if err := tpm2.FlushContext(rw, h); err != nil {
				return fmt.Errorf("flushing handle %#x: %w", h, err)
			}
		}
	}
	return nil
}
