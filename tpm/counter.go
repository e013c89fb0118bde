package tpm

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"
)

// The rollback counter is an NV index of type TPM_NT_COUNTER: 8 bytes the
// TPM only increments, kept across power cycles.
//
// Access: read and increment are authorised by the index itself, with an
// empty auth value (TPMA_NV_AUTHREAD | TPMA_NV_AUTHWRITE), and TPMA_NV_NO_DA
// keeps the index out of dictionary-attack accounting. Anyone who can send
// TPM commands may therefore increment it, which can only move it forward
// (the daemon then refuses its stale data directory: denial of service, not
// rollback). Defining and deleting need owner authorization; the owner
// password must be empty for DefineCounter.
const (
	nvTypeCounter tpm2.NVAttr = 0x1 << 4 // TPM_NT_COUNTER in TPMA_NV bits 7:4
	nvTypeMask    tpm2.NVAttr = 0xF << 4
	counterAttrs              = nvTypeCounter | tpm2.AttrAuthRead | tpm2.AttrAuthWrite | tpm2.AttrNoDA
	counterSize               = 8
)

// DefineCounter defines the rollback counter at Config.NVIndex and
// increments it once, since a TPM counter cannot be read before its first
// increment. The starting value is the TPM's choice, not 0 or 1: the TPM
// starts a new counter at the highest value any counter on it has had (so an
// undefine/define cannot roll it back). Only its growth is meaningful.
//
// If an earlier DefineCounter was interrupted between the two steps,
// DefineCounter completes it. Errors: ErrCounterExists (the index is defined
// and initialised; it is left alone), ErrUnavailable, ErrClosed, the
// context's error, or a TPM error (for instance, an owner password is set).
func (t *TPM) DefineCounter(ctx context.Context) error {
	h := tpmutil.Handle(t.cfg.NVIndex)
	return t.do(ctx, "define counter", func(rw io.ReadWriter) error {
		pub := tpm2.NVPublic{NVIndex: h, NameAlg: tpm2.AlgSHA256, Attributes: counterAttrs, DataSize: counterSize}
		auth := tpm2.AuthCommand{Session: tpm2.HandlePasswordSession, Attributes: tpm2.AttrContinueSession}
		err := tpm2.NVDefineSpaceEx(rw, tpm2.HandleOwner, "", pub, auth)
		if isRC(err, tpm2.RCNVDefined) {
			cur, err := readCounterPublic(rw, h)
			if err != nil || cur.Attributes&tpm2.AttrWritten != 0 {
				return fmt.Errorf("%w at NV index %#010x", ErrCounterExists, uint32(h))
			}
		} else if err != nil {
			return fmt.Errorf("defining NV index %#010x: %w", uint32(h), err)
		}
		if err := tpm2.NVIncrement(rw, h, ""); err != nil {
			return fmt.Errorf("first increment of NV index %#010x: %w", uint32(h), err)
		}
		return nil
	})
}

// ReadCounter returns the counter's value. Errors: ErrNoCounter (the index is
// not defined, or was defined but never incremented: run DefineCounter),
// ErrUnavailable, ErrClosed, the context's error, or an error saying that the
// index is not a counter.
func (t *TPM) ReadCounter(ctx context.Context) (uint64, error) {
	var v uint64
	err := t.do(ctx, "read counter", func(rw io.ReadWriter) (err error) {
		v, err = readCounter(rw, tpmutil.Handle(t.cfg.NVIndex))
		return err
	})
	return v, err
}

// IncrementCounter increments the counter and returns its new value.
//
// It is never retried: if the connection breaks after the command was sent,
// the error (ErrUnavailable) says that the increment may or may not have
// happened; call ReadCounter once the TPM is back instead of incrementing
// again blindly. Errors: as ReadCounter.
func (t *TPM) IncrementCounter(ctx context.Context) (uint64, error) {
	h := tpmutil.Handle(t.cfg.NVIndex)
	var v uint64
	err := t.do(ctx, "increment counter", func(rw io.ReadWriter) error {
		if _, err := readCounterPublic(rw, h); err != nil {
			return err
		}
		if err := tpm2.NVIncrement(rw, h, ""); err != nil {
			return fmt.Errorf("incrementing NV index %#010x: %w", uint32(h), err)
		}
		var err error
		v, err = readCounter(rw, h)
		return err
	})
	return v, err
}

// readCounterPublic reads the public area of the index and checks that it is a
// counter. Its errors wrap ErrNoCounter when the index is not defined.
func readCounterPublic(rw io.ReadWriter, h tpmutil.Handle) (tpm2.NVPublic, error) {
	pub, err := tpm2.NVReadPublic(rw, h)
	if code, kind, ok := tpmCode(err); ok && kind == "handle" && code == tpm2.RCHandle {
		return pub, fmt.Errorf("%w at NV index %#010x: run the step that defines it (hsmd init)", ErrNoCounter, uint32(h))
	}
	if err != nil {
		return pub, fmt.Errorf("reading NV index %#010x: %w", uint32(h), err)
	}
	if pub.Attributes&nvTypeMask != nvTypeCounter || pub.DataSize != counterSize {
		return pub, fmt.Errorf("NV index %#010x is defined but is not a counter (attributes %v); "+
			"choose a free index in tpm.nv_index", uint32(h), pub.Attributes)
	}
	return pub, nil
}

func readCounter(rw io.ReadWriter, h tpmutil.Handle) (uint64, error) {
	pub, err := readCounterPublic(rw, h)
	if err != nil {
		return 0, err
	}
	if pub.Attributes&tpm2.AttrWritten == 0 {
		return 0, fmt.Errorf("%w: NV index %#010x is defined but was never incremented; run DefineCounter again",
			ErrNoCounter, uint32(h))
	}
	b, err := tpm2.NVReadEx(rw, h, h, "", counterSize)
	if err != nil {
		return 0, fmt.Errorf("reading NV index %#010x: %w", uint32(h), err)
	}
	if len(b) != counterSize {
		return 0, fmt.Errorf("reading NV index %#010x: got %d bytes, want %d", uint32(h), len(b), counterSize)
	}
	return binary.BigEndian.Uint64(b), nil
}
