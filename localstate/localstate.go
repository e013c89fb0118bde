// Package localstate binds hsmd's data directory to the machine's TPM.
//
// At init it draws a 32-byte state key, seals it together with the HSM user
// PIN to the TPM's PCR policy (the blob lives in <data-dir>/tpm/sealed.bin),
// and defines the TPM's rollback counter. At start it unseals both: the PIN
// logs in to the HSM, and the state key authenticates the store (see
// store.Sealed), whose sealed state carries the counter value it was bound
// to. Check refuses a store edited offline or older than the TPM counter;
// Counter advances the counter in two phases, so that a crash never looks
// like a rollback.
//
// The package declares the small TPM interface it needs; tpm.TPM implements
// it. Secrets print as REDACTED; erasure is best effort (see Secrets.Clear).
package localstate

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"os"
	"path/filepath"

	"github.com/hsmd/hsmd/internal/fsutil"
)

// TPM is what local state needs of a TPM.
type TPM interface {
	Seal(ctx context.Context, secret []byte) ([]byte, error)
	Unseal(ctx context.Context, blob []byte) ([]byte, error)
	DefineCounter(ctx context.Context) error
	ReadCounter(ctx context.Context) (uint64, error)
	IncrementCounter(ctx context.Context) (uint64, error)
}

// Errors.
var (
	// ErrNotInitialized: the data directory has no sealed secrets.
	ErrNotInitialized = errors.New("localstate: no sealed secrets in the data directory")
	// ErrInitialized: Init found sealed secrets already.
	ErrInitialized = errors.New("localstate: the data directory already has sealed secrets")
	// ErrPINTooLong: the PIN does not fit the TPM's sealing limit.
	ErrPINTooLong = errors.New("localstate: the PIN is too long to seal")
)

const (
	payloadV1 = 0x01
	// MaxPINSize is the longest PIN that fits a sealed payload (the TPM
	// seals at most 128 bytes: a version byte, the state key and the PIN).
	MaxPINSize = 128 - 1 - 32
	// SealedFile is the blob's path inside the data directory.
	SealedFile = "tpm/sealed.bin"
)

// Secrets are what the TPM unseals. They implement store.Sealer. The zero
// value is not usable; Clear them when done.
type Secrets struct {
	stateKey [32]byte
	pin      []byte
}

// MAC is HMAC-SHA256 under the state key (store.Sealer).
func (s *Secrets) MAC(msg []byte) [32]byte {
	m := hmac.New(sha256.New, s.stateKey[:])
	m.Write(msg)
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// NewMAC returns a new HMAC-SHA256 under the state key (store.Sealer).
func (s *Secrets) NewMAC() hash.Hash { return hmac.New(sha256.New, s.stateKey[:]) }

// PIN returns a fresh copy of the HSM user PIN, for hsm.Config.PINSource.
func (s *Secrets) PIN() ([]byte, error) { return append([]byte(nil), s.pin...), nil }

// Clear overwrites the secrets (best effort: Go may have copied them).
func (s *Secrets) Clear() {
	clear(s.stateKey[:])
	clear(s.pin)
}

// String and GoString print no secret.
func (s *Secrets) String() string   { return "localstate.Secrets{REDACTED}" }
func (s *Secrets) GoString() string { return s.String() }

// Init draws a state key, seals it with pin to t, writes the blob under
// dataDir (durably), and defines the rollback counter (an existing counter
// is adopted: its value only grows). It returns the secrets and the
// counter's value. Errors: ErrInitialized if a blob exists, ErrPINTooLong,
// and the TPM's.
func Init(ctx context.Context, t TPM, dataDir string, pin []byte) (*Secrets, uint64, error) {
	path := filepath.Join(dataDir, SealedFile)
	if _, err := os.Stat(path); err == nil {
		return nil, 0, fmt.Errorf("%w (%s)", ErrInitialized, path)
	}
	if len(pin) > MaxPINSize || len(pin) == 0 {
		return nil, 0, fmt.Errorf("%w: %d bytes, at most %d", ErrPINTooLong, len(pin), MaxPINSize)
	}
	s := &Secrets{pin: append([]byte(nil), pin...)}
	rand.Read(s.stateKey[:])
	payload := make([]byte, 0, 1+32+len(pin))
	payload = append(append(append(payload, payloadV1), s.stateKey[:]...), pin...)
	defer clear(payload)
	blob, err := t.Seal(ctx, payload)
	if err != nil {
		return nil, 0, fmt.Errorf("localstate: seal: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, 0, err
	}
	if err := fsutil.WriteFileAtomic(path, blob, 0o600); err != nil {
		return nil, 0, fmt.Errorf("localstate: %w", err)
	}
	n, err := defineOrAdopt(ctx, t)
	if err != nil {
		return nil, 0, err
	}
	return s, n, nil
}

// defineOrAdopt reads the rollback counter, defining it first if it cannot
// be read.
func defineOrAdopt(ctx context.Context, t TPM) (uint64, error) {
	if n, err := t.ReadCounter(ctx); err == nil {
		return n, nil
	}
	if err := t.DefineCounter(ctx); err != nil {
		return 0, fmt.Errorf("localstate: define the rollback counter: %w", err)
	}
	n, err := t.ReadCounter(ctx)
	if err != nil {
		return 0, fmt.Errorf("localstate: read the rollback counter: %w", err)
	}
	return n, nil
}

// Unseal reads the blob under dataDir and unseals it. Errors:
// ErrNotInitialized (wrapped) if there is no blob; the TPM's errors
// (tpm.ErrPCRMismatch, ErrWrongTPM, ErrCorrupt …) wrapped, never the
// blob's content.
func Unseal(ctx context.Context, t TPM, dataDir string) (*Secrets, error) {
	path := filepath.Join(dataDir, SealedFile)
	blob, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w (%s)", ErrNotInitialized, path)
	}
	if err != nil {
		return nil, fmt.Errorf("localstate: %w", err)
	}
	payload, err := t.Unseal(ctx, blob)
	if err != nil {
		return nil, fmt.Errorf("localstate: unseal %s: %w", path, err)
	}
	defer clear(payload)
	if len(payload) < 1+32+1 || payload[0] != payloadV1 {
		return nil, fmt.Errorf("localstate: unseal %s: unknown payload format", path)
	}
	s := &Secrets{pin: append([]byte(nil), payload[33:]...)}
	copy(s.stateKey[:], payload[1:33])
	return s, nil
}
