package audit

import (
	"bytes"
	"context"
	"crypto/hmac"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera/client"

	"github.com/hsmd/hsmd/internal/fsutil"
)

// MAC authenticates the anchor: in hsmd, HMAC-SHA256 under the state key
// the TPM unseals (localstate.Secrets.MAC).
type MAC func(msg []byte) [32]byte

// ErrAnchor: the log does not extend the head its anchor recorded (it was
// truncated or rewritten), or the anchor is older than the TPM's rollback
// counter (the log was restored from an older copy), or the anchor itself
// was edited. hsmd refuses to start.
var ErrAnchor = errors.New("audit: the audit log does not match its TPM-bound anchor")

// anchor ties a head of the log (size, root) to a value of the TPM's
// rollback counter. hsmd rewrites it, bound to the next counter value,
// just before every advance of the counter (each start, each key change),
// so an anchor older than the TPM's counter is a rolled-back copy.
type anchor struct {
	Counter uint64 `json:"counter"`
	Size    uint64 `json:"size"`
	Root    []byte `json:"root"`
	MAC     []byte `json:"mac"`
}

func (a *anchor) message() []byte {
	m := []byte("hsmd/audit/anchor/v1\x00")
	m = binary.BigEndian.AppendUint64(m, a.Counter)
	m = binary.BigEndian.AppendUint64(m, a.Size)
	return append(m, a.Root...)
}

// Bind records the log's durable head in the anchor, bound to counter
// (the value the rollback counter is about to take), durably.
func (l *Log) Bind(ctx context.Context, counter uint64, mac MAC) error {
	size, root, err := l.Head(ctx)
	if err != nil {
		return err
	}
	a := anchor{Counter: counter, Size: size, Root: root}
	m := mac(a.message())
	a.MAC = m[:]
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(l.cfg.Dir, AnchorFile), b, 0o600); err != nil {
		return fmt.Errorf("audit: write the anchor: %w", err)
	}
	return nil
}

// CheckAnchor checks, at start, that the log extends the head its anchor
// recorded (same entries, maybe more) and that the anchor is not older than
// counter, the TPM's rollback counter. A log without an anchor passes only
// if it is empty and newLog says a new log is expected (the data
// directory's first start, or an operator's explicit choice): otherwise
// the anchor, or the whole audit directory, was deleted. Errors wrap
// ErrAnchor.
func (l *Log) CheckAnchor(ctx context.Context, counter uint64, mac MAC, newLog bool) error {
	b, err := os.ReadFile(filepath.Join(l.cfg.Dir, AnchorFile))
	if errors.Is(err, fs.ErrNotExist) {
		if n := l.Size(); n > 0 {
			return fmt.Errorf("%w: the log holds %d entries but its anchor is missing", ErrAnchor, n)
		}
		if !newLog {
			return fmt.Errorf("%w: the audit log and its anchor are missing (deleted, or this data directory predates the audit log)", ErrAnchor)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("audit: read the anchor: %w", err)
	}
	var a anchor
	if err := json.Unmarshal(b, &a); err != nil {
		return fmt.Errorf("%w: the anchor is malformed", ErrAnchor)
	}
	want := mac(a.message())
	if !hmac.Equal(want[:], a.MAC) {
		return fmt.Errorf("%w: the anchor's MAC does not verify (edited, or from another machine)", ErrAnchor)
	}
	if a.Counter < counter {
		return fmt.Errorf("%w: the anchor is bound to rollback counter %d but the TPM is at %d: the audit log was restored from an older copy", ErrAnchor, a.Counter, counter)
	}
	size, root, err := l.Head(ctx)
	if err != nil {
		return err
	}
	if size < a.Size {
		return fmt.Errorf("%w: the log holds %d entries but had %d: it was truncated", ErrAnchor, size, a.Size)
	}
	if size == a.Size {
		if !bytes.Equal(root, a.Root) {
			return fmt.Errorf("%w: the log's entries changed (root hash at size %d differs)", ErrAnchor, size)
		}
		return nil
	}
	if a.Size == 0 {
		if !bytes.Equal(a.Root, rfc6962.DefaultHasher.EmptyRoot()) {
			return fmt.Errorf("%w: the anchor's empty root is wrong", ErrAnchor)
		}
		return nil
	}
	pb, err := client.NewProofBuilder(ctx, size, dirReader{l.treeDir}.ReadTile)
	if err != nil {
		return err
	}
	p, err := pb.ConsistencyProof(ctx, a.Size, size)
	if err != nil {
		return fmt.Errorf("audit: consistency proof %d→%d: %w", a.Size, size, err)
	}
	if err := proof.VerifyConsistency(rfc6962.DefaultHasher, a.Size, size, p, a.Root, root); err != nil {
		return fmt.Errorf("%w: the log at size %d does not extend the anchored head at size %d (entries rewritten)", ErrAnchor, size, a.Size)
	}
	return nil
}
