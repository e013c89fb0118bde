package signing

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/transparency-dev/formats/log"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/internal/fsutil"
)

// Errors of Witness.AddCheckpoint. The comment on each names the HTTP status
// of the C2SP tlog-witness add-checkpoint endpoint it stands for.
var (
	// ErrUnknownOrigin: the checkpoint's origin is not a registered log (404).
	ErrUnknownOrigin = errors.New("signing: witness: unknown log origin")
	// ErrBadLogSignature: the checkpoint carries no valid signature by the
	// registered log key, or a signature claiming that key fails (403).
	ErrBadLogSignature = errors.New("signing: witness: no valid log signature")
	// ErrConflict: the caller's old size is not the witness's latest cosigned
	// size for the origin (409). The error is a *ConflictError carrying that
	// size, which the caller must return in the response body.
	ErrConflict = errors.New("signing: witness: old size conflict")
	// ErrBadProof: the consistency proof (or, at equal sizes, the root hash)
	// does not match the witness's latest cosigned checkpoint (422).
	ErrBadProof = errors.New("signing: witness: consistency proof failed")
	// ErrMalformed: the request or the checkpoint cannot be parsed, is over a
	// size limit, or asks to move the log backwards (old size greater than
	// the checkpoint size) (400).
	ErrMalformed = errors.New("signing: witness: malformed request")
)

// Limits on attacker-controlled input, checked before any work is done.
const (
	// MaxCheckpointSize bounds the signed checkpoint note, in bytes.
	MaxCheckpointSize = 16 << 10
	// MaxProofHashes bounds the consistency proof: a proof in a tree of at
	// most 2^64 leaves has fewer than 2*64 hashes.
	MaxProofHashes = 128
)

// ConflictError is the C2SP 409 answer: Size is the tree size of the latest
// checkpoint the witness cosigned for the origin (0 if none). It matches
// ErrConflict under errors.Is.
type ConflictError struct{ Size uint64 }

func (e *ConflictError) Error() string {
	return fmt.Sprintf("%v: witness is at size %d", ErrConflict, e.Size)
}

// Is reports whether target is ErrConflict.
func (e *ConflictError) Is(target error) bool { return target == ErrConflict }

// WitnessState persists, per origin, the newest size and root hash the
// witness cosigned. Implementations must be safe for concurrent use.
type WitnessState interface {
	// Get returns the stored (size, root) for origin; ok is false if the
	// witness never cosigned a checkpoint for it.
	Get(ctx context.Context, origin string) (size uint64, root []byte, ok bool, err error)
	// CompareAndSet stores (size, root) if the stored value is still
	// (oldSize, oldRoot) — a nil oldRoot with oldSize 0 means "absent" — and
	// reports false, storing nothing, if it changed meanwhile. It returns
	// only once the new value is durable.
	CompareAndSet(ctx context.Context, origin string, oldSize uint64, oldRoot []byte, size uint64, root []byte) (bool, error)
}

// Witness is the core of a C2SP tlog-witness: it cosigns checkpoints of
// registered logs that are consistent with the last checkpoint it cosigned
// for each. Its fields must not change once it is in use; AddCheckpoint is
// then safe for concurrent use (State serialises updates with
// CompareAndSet).
type Witness struct {
	// Signer makes the cosignature, for example a cosignature/v1 signer
	// (transparency-dev/formats/note.NewSignerForCosignatureV1, or this
	// package's MLDSASigner) or a NoteSigner. A signer with a
	// WithContext(context.Context) note.Signer method (NoteSigner) is
	// bounded by the request's context.
	Signer note.Signer
	// Logs maps each registered log's origin to its verifier key.
	Logs map[string]note.Verifier
	// State holds the latest cosigned size and root hash per origin.
	State WitnessState
	// Now is the witness's clock (nil means time.Now). The add-checkpoint
	// rules do not consult it; cosignature timestamps come from the
	// Signer's own clock.
	Now func() time.Time
}

// contextualSigner is the optional ability of a note.Signer (NoteSigner) to
// bind one signing call to a context.
type contextualSigner interface {
	WithContext(ctx context.Context) note.Signer
}

// AddCheckpoint implements the C2SP tlog-witness add-checkpoint rules.
// oldSize is the size the caller believes the witness has for the origin,
// proof the consistency proof from oldSize to the checkpoint's size (empty
// when oldSize is 0 or equal to that size), and checkpoint the log's signed
// note. In order:
//
//   - the origin (the note's first line) must be registered, else
//     ErrUnknownOrigin;
//   - the note must carry a valid signature by the registered key, else
//     ErrBadLogSignature; its body must be a checkpoint with a 32-byte root
//     hash, else ErrMalformed;
//   - oldSize must equal the stored size (0 when absent), else a
//     *ConflictError with the stored size;
//   - the checkpoint size must not be below oldSize, else ErrMalformed (the
//     spec's 400 Bad Request: a rollback request is malformed, not a proof
//     failure);
//   - the proof must prove (oldSize, stored root) consistent with the
//     checkpoint's (size, root) under RFC 6962 SHA-256, else ErrBadProof.
//     At equal sizes the proof must be empty and the roots equal, so a fork
//     at the same size is ErrBadProof;
//   - the new (size, root) is stored with CompareAndSet before anything is
//     signed; losing a race gives a *ConflictError with the winner's size.
//
// It returns the cosignature: the note signature line(s) that Signer
// produced over the checkpoint body, each ending in a newline, ready to be
// appended to the checkpoint's own signatures. Resubmitting the latest
// cosigned checkpoint (oldSize equal to its size, empty proof) cosigns it
// again.
func (w *Witness) AddCheckpoint(ctx context.Context, oldSize uint64, proofHashes [][]byte, checkpoint []byte) ([]byte, error) {
	if len(checkpoint) > MaxCheckpointSize {
		return nil, fmt.Errorf("%w: checkpoint of %d bytes exceeds %d", ErrMalformed, len(checkpoint), MaxCheckpointSize)
	}
	if len(proofHashes) > MaxProofHashes {
		return nil, fmt.Errorf("%w: proof of %d hashes exceeds %d", ErrMalformed, len(proofHashes), MaxProofHashes)
	}
	origin, _, ok := bytes.Cut(checkpoint, []byte("\n"))
	if !ok || len(origin) == 0 {
		return nil, fmt.Errorf("%w: checkpoint has no origin line", ErrMalformed)
	}
	v, ok := w.Logs[string(origin)]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownOrigin, origin)
	}

	n, err := note.Open(checkpoint, note.VerifierList(v))
	if err != nil {
		var unverified *note.UnverifiedNoteError
		var invalid *note.InvalidSignatureError
		if errors.As(err, &unverified) || errors.As(err, &invalid) {
			return nil, fmt.Errorf("%w for %q: %v", ErrBadLogSignature, origin, err)
		}
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	var cp log.Checkpoint
	if _, err := cp.Unmarshal([]byte(n.Text)); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if cp.Origin != string(origin) {
		// Unreachable: the origin is the note's first line.
		return nil, fmt.Errorf("%w: origin mismatch", ErrMalformed)
	}
	if len(cp.Hash) != crypto.SHA256.Size() {
		return nil, fmt.Errorf("%w: root hash of %d bytes, want %d", ErrMalformed, len(cp.Hash), crypto.SHA256.Size())
	}

	storedSize, storedRoot, ok, err := w.State.Get(ctx, cp.Origin)
	if err != nil {
		return nil, fmt.Errorf("signing: witness: reading state: %w", err)
	}
	if !ok {
		storedSize, storedRoot = 0, nil
	}
	if oldSize != storedSize {
		return nil, &ConflictError{Size: storedSize}
	}
	if cp.Size < oldSize {
		return nil, fmt.Errorf("%w: checkpoint size %d is below old size %d", ErrMalformed, cp.Size, oldSize)
	}
	root1 := storedRoot
	if !ok {
		root1 = rfc6962.DefaultHasher.EmptyRoot()
	}
	if err := proof.VerifyConsistency(rfc6962.DefaultHasher, oldSize, cp.Size, proofHashes, root1, cp.Hash); err != nil {
		return nil, fmt.Errorf("%w: %d -> %d: %v", ErrBadProof, oldSize, cp.Size, err)
	}

	if !ok || cp.Size != storedSize {
		set, err := w.State.CompareAndSet(ctx, cp.Origin, storedSize, storedRoot, cp.Size, cp.Hash)
		if err != nil {
			return nil, fmt.Errorf("signing: witness: storing state: %w", err)
		}
		if !set {
			size, _, _, err := w.State.Get(ctx, cp.Origin)
			if err != nil {
				return nil, fmt.Errorf("signing: witness: reading state: %w", err)
			}
			return nil, &ConflictError{Size: size}
		}
	}
	return w.cosign(ctx, n.Text)
}

// cosign returns the signature line(s) of w.Signer over the note body text.
func (w *Witness) cosign(ctx context.Context, text string) ([]byte, error) {
	s := w.Signer
	if cs, ok := s.(contextualSigner); ok {
		s = cs.WithContext(ctx)
	}
	signed, err := note.Sign(&note.Note{Text: text}, s)
	if err != nil {
		return nil, fmt.Errorf("signing: witness: cosigning: %w", err)
	}
	// note.Sign returns text, a blank line, then the signature lines.
	sigs, ok := bytes.CutPrefix(signed, []byte(text+"\n"))
	if !ok {
		return nil, errors.New("signing: witness: cosigning: unexpected note layout")
	}
	return sigs, nil
}

// witnessFileVersion is the format version of the FileWitnessState file.
const witnessFileVersion = 1

type witnessFile struct {
	Version int                         `json:"version"`
	Logs    map[string]witnessFileEntry `json:"logs"`
}

type witnessFileEntry struct {
	Size uint64 `json:"size"`
	Root []byte `json:"root"` // base64 in JSON
}

// FileWitnessState is a WitnessState kept in one JSON file, rewritten
// whole on every change: temporary file, fsync, rename, fsync of the
// directory. A mutex serialises it within the process; two processes must
// not share one file. It is safe for concurrent use.
type FileWitnessState struct {
	path string

	mu   sync.Mutex
	logs map[string]witnessFileEntry
}

var _ WitnessState = (*FileWitnessState)(nil)

// NewFileWitnessState loads the state file at path. A missing file is an
// empty state (the file is created by the first update); a file with
// another format version or unknown fields is an error.
func NewFileWitnessState(path string) (*FileWitnessState, error) {
	s := &FileWitnessState{path: path, logs: map[string]witnessFileEntry{}}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("signing: witness state: %w", err)
	}
	var f witnessFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("signing: witness state %s: %w", path, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("signing: witness state %s: trailing data", path)
	}
	if f.Version != witnessFileVersion {
		return nil, fmt.Errorf("signing: witness state %s: version %d, want %d", path, f.Version, witnessFileVersion)
	}
	for origin, e := range f.Logs {
		if origin == "" || len(e.Root) == 0 {
			return nil, fmt.Errorf("signing: witness state %s: invalid entry for origin %q", path, origin)
		}
		s.logs[origin] = e
	}
	return s, nil
}

// Get implements WitnessState. The returned root is a copy.
func (s *FileWitnessState) Get(ctx context.Context, origin string) (uint64, []byte, bool, error) {
	if err := ctx.Err(); err != nil {
		return 0, nil, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.logs[origin]
	if !ok {
		return 0, nil, false, nil
	}
	return e.Size, bytes.Clone(e.Root), true, nil
}

// CompareAndSet implements WitnessState. The in-memory state changes only
// once the file has been durably replaced.
func (s *FileWitnessState) CompareAndSet(ctx context.Context, origin string, oldSize uint64, oldRoot []byte, size uint64, root []byte) (bool, error) {
	if origin == "" || len(root) == 0 {
		return false, errors.New("signing: witness state: empty origin or root")
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cur, ok := s.logs[origin]
	switch {
	case !ok && (oldSize != 0 || oldRoot != nil):
		return false, nil
	case ok && (cur.Size != oldSize || !bytes.Equal(cur.Root, oldRoot)):
		return false, nil
	}
	next := make(map[string]witnessFileEntry, len(s.logs)+1)
	for k, v := range s.logs {
		next[k] = v
	}
	next[origin] = witnessFileEntry{Size: size, Root: bytes.Clone(root)}
	b, err := json.MarshalIndent(witnessFile{Version: witnessFileVersion, Logs: next}, "", "\t")
	if err != nil {
		return false, fmt.Errorf("signing: witness state: %w", err)
	}
	if err := fsutil.WriteFileAtomic(s.path, append(b, '\n'), 0o600); err != nil {
		return false, fmt.Errorf("signing: witness state: %w", err)
	}
	s.logs = next
	return true, nil
}
