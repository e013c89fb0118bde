package audit

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"sync"

	"github.com/transparency-dev/formats/log"
	"golang.org/x/mod/sumdb/note"
)

// MaxCheckpointSize bounds one archived checkpoint note.
const MaxCheckpointSize = 64 << 10

// archive appends every checkpoint the log publishes to CheckpointsFile:
// each record is a 4-byte big-endian length and the signed note. A
// checkpoint is archived (and fsync'd) before tessera publishes it, so the
// archive never lacks a published checkpoint.
type archive struct {
	mu       sync.Mutex
	f        *os.File
	lastSize uint64
	sigs     [][]byte // signatures of the note being signed, by signer
	text     []byte
	torn     error // set when a partial record could not be cut off
}

func openArchive(path string) (*archive, error) {
	a := &archive{}
	var err error
	var end int64
	for cp, rerr := range readArchive(path) {
		if rerr != nil {
			if errors.Is(rerr, os.ErrNotExist) {
				break
			}
			if !errors.Is(rerr, errTornTail) {
				return nil, rerr
			}
			if err := os.Truncate(path, end); err != nil {
				return nil, fmt.Errorf("audit: repair the checkpoint archive: %w", err)
			}
			break
		}
		a.lastSize, end = cp.Size, cp.end
	}
	if a.f, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("audit: open the checkpoint archive: %w", err)
	}
	return a, nil
}

func (a *archive) close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.f == nil {
		return nil
	}
	err := a.f.Close()
	a.f = nil
	return err
}

// capture wraps signers so that, once the last of them signed a note, the
// whole note is archived before it is returned to tessera. tessera signs
// one checkpoint at a time (under its publish lock).
func (a *archive) capture(signers []note.Signer) []note.Signer {
	out := make([]note.Signer, len(signers))
	for i, s := range signers {
		out[i] = &capturingSigner{Signer: s, a: a, i: i, last: i == len(signers)-1, all: signers}
	}
	return out
}

type capturingSigner struct {
	note.Signer
	a    *archive
	i    int
	last bool
	all  []note.Signer
}

func (c *capturingSigner) Sign(msg []byte) ([]byte, error) {
	sig, err := c.Signer.Sign(msg)
	if err != nil {
		return nil, err
	}
	a := c.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if c.i == 0 {
		a.sigs, a.text = make([][]byte, len(c.all)), append([]byte(nil), msg...)
	}
	if a.sigs == nil || string(a.text) != string(msg) {
		return nil, errors.New("audit: checkpoint signers called out of order")
	}
	a.sigs[c.i] = sig
	if !c.last {
		return sig, nil
	}
	replay := make([]note.Signer, len(c.all))
	for i, s := range c.all {
		replay[i] = fixedSigner{Signer: s, sig: a.sigs[i]}
	}
	n, err := note.Sign(&note.Note{Text: string(msg)}, replay...)
	a.sigs, a.text = nil, nil
	if err != nil {
		return nil, err
	}
	if err := a.appendLocked(n); err != nil {
		return nil, err
	}
	return sig, nil
}

type fixedSigner struct {
	note.Signer
	sig []byte
}

func (f fixedSigner) Sign([]byte) ([]byte, error) { return f.sig, nil }

func (a *archive) appendLocked(n []byte) error {
	if a.f == nil {
		return errors.New("audit: checkpoint archive closed")
	}
	cp, err := parseCheckpointText(n)
	if err != nil {
		return err
	}
	if a.torn != nil {
		return a.torn
	}
	fi, err := a.f.Stat()
	if err != nil {
		return fmt.Errorf("audit: archive checkpoint: %w", err)
	}
	rec := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(n)), uint32(len(n)))
	rec = append(rec, n...)
	_, err = a.f.Write(rec)
	if err == nil {
		err = a.f.Sync()
	}
	if err != nil {
		return a.cut(fi.Size(), err)
	}
	a.lastSize = cp.Size
	return nil
}

// cut removes what a failed append wrote past end (a full disk writes part
// of a record), so that the next record follows the last whole one. If
// that fails too, the archive takes no more records: the partial one
// stays its tail, which openArchive repairs.
func (a *archive) cut(end int64, err error) error {
	if terr := a.f.Truncate(end); terr != nil {
		a.torn = fmt.Errorf("audit: archive checkpoint: %w; cutting the partial record failed (%v): restart hsmd", err, terr)
		return a.torn
	}
	return fmt.Errorf("audit: archive checkpoint: %w", err)
}

// ArchivedCheckpoint is one record of the checkpoint archive.
type ArchivedCheckpoint struct {
	// N is the record's position in the archive, from 0.
	N int
	// Note is the signed note as published.
	Note []byte
	log.Checkpoint
	end int64 // offset just past the record
}

// errTornTail: the archive ends in an incomplete record, as a crash in the
// middle of an append leaves it (that checkpoint was never published).
var errTornTail = errors.New("audit: checkpoint archive ends in an incomplete record")

// parseCheckpointText parses the (unverified) checkpoint body of a note.
func parseCheckpointText(n []byte) (*log.Checkpoint, error) {
	var cp log.Checkpoint
	if _, err := cp.Unmarshal(n); err != nil {
		return nil, fmt.Errorf("audit: malformed checkpoint: %w", err)
	}
	return &cp, nil
}

// readArchive yields the archived checkpoints of the file at path in
// order, stopping at the first error (a damaged record, or
// os.ErrNotExist). Signatures are not checked here.
func readArchive(path string) iter.Seq2[ArchivedCheckpoint, error] {
	return func(yield func(ArchivedCheckpoint, error) bool) {
		f, err := os.Open(path)
		if err != nil {
			yield(ArchivedCheckpoint{}, err)
			return
		}
		defer f.Close()
		r := bufio.NewReader(f)
		var off int64
		for i := 0; ; i++ {
			var hdr [4]byte
			if _, err := io.ReadFull(r, hdr[:]); err != nil {
				if err == io.EOF {
					return
				}
				yield(ArchivedCheckpoint{}, fmt.Errorf("%w (record %d)", errTornTail, i))
				return
			}
			n := binary.BigEndian.Uint32(hdr[:])
			if n == 0 || n > MaxCheckpointSize {
				yield(ArchivedCheckpoint{}, fmt.Errorf("audit: checkpoint archive record %d: bad length %d", i, n))
				return
			}
			b := make([]byte, n)
			if _, err := io.ReadFull(r, b); err != nil {
				yield(ArchivedCheckpoint{}, fmt.Errorf("%w (record %d)", errTornTail, i))
				return
			}
			off += 4 + int64(n)
			cp, err := parseCheckpointText(b)
			if err != nil {
				yield(ArchivedCheckpoint{}, fmt.Errorf("audit: checkpoint archive record %d: %w", i, err))
				return
			}
			if !yield(ArchivedCheckpoint{N: i, Note: b, Checkpoint: *cp, end: off}, nil) {
				return
			}
		}
	}
}
