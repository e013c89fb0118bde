package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"os"
	"path/filepath"
	"slices"

	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera/api"
	"github.com/transparency-dev/tessera/client"
	"github.com/transparency-dev/tessera/fsck"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/signing"
)

// Report is what Verify checked.
type Report struct {
	// Checkpoints is the number of archived checkpoints, all verified.
	Checkpoints int
	// Size and Root are those of the newest checkpoint; Entries were
	// recomputed up to it.
	Size uint64
	Root []byte
	// Uncovered counts entries durably in the tree after the newest
	// checkpoint (a crash before its publication); the next start
	// publishes one covering them.
	Uncovered uint64
	// Unpublished counts archived checkpoints newer than the published
	// one: a checkpoint is archived before it is published, so a crash
	// between the two, or a log being written while Verify reads it,
	// leaves the published one behind. The next publication catches up.
	Unpublished int
}

// VerifyError names the first bad entry or checkpoint Verify found.
type VerifyError struct {
	// Entry is the index of the bad entry, or -1.
	Entry int64
	// Checkpoint is the archive position of the bad checkpoint, or -1.
	Checkpoint int
	Reason     string
}

func (e *VerifyError) Error() string {
	switch {
	case e.Entry >= 0:
		return fmt.Sprintf("audit verify: entry %d: %s", e.Entry, e.Reason)
	case e.Checkpoint >= 0:
		return fmt.Sprintf("audit verify: checkpoint #%d: %s", e.Checkpoint, e.Reason)
	}
	return "audit verify: " + e.Reason
}

func badEntry(i uint64, format string, a ...any) error {
	return &VerifyError{Entry: int64(i), Checkpoint: -1, Reason: fmt.Sprintf(format, a...)}
}

func badCheckpoint(n int, format string, a ...any) error {
	return &VerifyError{Entry: -1, Checkpoint: n, Reason: fmt.Sprintf(format, a...)}
}

// Verify checks the audit log in dir offline, with the verifier keys the
// caller trusts: every checkpoint must carry a valid signature from each
// key, except that keys of one signature type parsed by ParseVerifiers are
// alternatives (the versions of a rotated key): one valid signature per
// type is then demanded.
//
//   - every archived checkpoint is signed as said above, has the log's
//     origin, and does not shrink the tree; the published checkpoint is
//     one of them (the newest, but for a crash or a write in progress:
//     Report.Unpublished); an incomplete record at the archive's end (a
//     crash while archiving, or a write in progress) is not a checkpoint;
//   - every entry up to the newest checkpoint parses and hashes to the
//     leaf the tree holds;
//   - the root recomputed from the entries equals each checkpoint's root
//     at its size, and each checkpoint is consistent with the previous one
//     (an RFC 6962 consistency proof built from the tiles);
//   - every tile is what the entries make (tessera's fsck).
//
// It returns a *VerifyError naming the first bad entry or checkpoint.
func Verify(ctx context.Context, dir string, verifiers []note.Verifier) (*Report, error) {
	origin, err := logOrigin(verifiers)
	if err != nil {
		return nil, err
	}
	d := dirReader{filepath.Join(dir, TreeDir)}
	// The published checkpoint first: it is archived before it is
	// published, so the archive read after it holds it even while hsmd
	// writes the log.
	published, err := d.ReadCheckpoint(ctx)
	if err != nil {
		return nil, &VerifyError{Entry: -1, Checkpoint: -1, Reason: fmt.Sprintf("read the published checkpoint: %v", err)}
	}
	var cps []ArchivedCheckpoint
	for cp, err := range readArchive(filepath.Join(dir, CheckpointsFile)) {
		if errors.Is(err, errTornTail) {
			break // hsmd cuts it off at its next start
		}
		if err != nil {
			return nil, badCheckpoint(len(cps), "%v", err)
		}
		if err := verifyNote(cp.Note, verifiers); err != nil {
			return nil, badCheckpoint(cp.N, "size %d: %v", cp.Size, err)
		}
		if cp.Origin != origin {
			return nil, badCheckpoint(cp.N, "origin %q, want %q", cp.Origin, origin)
		}
		if len(cps) > 0 {
			prev := cps[len(cps)-1]
			if cp.Size < prev.Size {
				return nil, badCheckpoint(cp.N, "size %d is below the previous checkpoint's %d", cp.Size, prev.Size)
			}
		}
		cps = append(cps, cp)
	}
	if len(cps) == 0 {
		return nil, badCheckpoint(0, "the archive holds no checkpoint")
	}
	newest := cps[len(cps)-1]
	pub := slices.IndexFunc(cps, func(cp ArchivedCheckpoint) bool { return bytes.Equal(cp.Note, published) })
	if pub < 0 {
		return nil, &VerifyError{Entry: -1, Checkpoint: -1, Reason: "the published checkpoint is not in the archive"}
	}

	// Recompute the tree from the entries.
	r := rangeFactory.NewEmptyRange(0)
	next := 0 // the next checkpoint to compare
	check := func() error {
		for next < len(cps) && cps[next].Size == r.End() {
			root, err := r.GetRootHash(nil)
			if err != nil {
				return err
			}
			if r.End() == 0 {
				e := rfc6962.DefaultHasher.EmptyRoot()
				root = e[:]
			}
			if !bytes.Equal(root, cps[next].Hash) {
				return badCheckpoint(cps[next].N, "size %d: root hash does not match the entries", cps[next].Size)
			}
			next++
		}
		return nil
	}
	if err := check(); err != nil {
		return nil, err
	}
	size := newest.Size
	getSize := func(context.Context) (uint64, error) { return size, nil }
	for b, err := range client.EntryBundles(ctx, 2, getSize, d.ReadEntryBundle, 0, size) {
		if err != nil {
			return nil, badEntry(r.End(), "read its bundle: %v", err)
		}
		var eb api.EntryBundle
		if err := eb.UnmarshalText(b.Data); err != nil {
			return nil, badEntry(r.End(), "malformed entry bundle: %v", err)
		}
		first := b.RangeInfo.Index*256 + uint64(b.RangeInfo.First)
		if int(b.RangeInfo.First)+int(b.RangeInfo.N) > len(eb.Entries) {
			return nil, badEntry(first+uint64(len(eb.Entries)-int(b.RangeInfo.First)), "missing from its bundle")
		}
		leaves, err := client.FetchLeafHashes(ctx, d.ReadTile, first, uint64(b.RangeInfo.N), size)
		if err != nil {
			return nil, badEntry(first, "read the tree's leaf hashes: %v", err)
		}
		for j, data := range eb.Entries[b.RangeInfo.First : b.RangeInfo.First+b.RangeInfo.N] {
			i := first + uint64(j)
			_, err := ParseEntry(data)
			if err != nil {
				return nil, badEntry(i, "%v", err)
			}
			h := rfc6962.DefaultHasher.HashLeaf(data)
			if !bytes.Equal(h, leaves[j]) {
				return nil, badEntry(i, "its hash differs from the tree's leaf")
			}
			if err := r.Append(h, nil); err != nil {
				return nil, err
			}
			if err := check(); err != nil {
				return nil, err
			}
		}
	}
	if next != len(cps) {
		return nil, badCheckpoint(cps[next].N, "size %d: entries missing", cps[next].Size)
	}

	// Consistency between consecutive checkpoints, from the tiles.
	pb, err := client.NewProofBuilder(ctx, size, d.ReadTile)
	if err != nil {
		return nil, err
	}
	for k := 1; k < len(cps); k++ {
		a, b := cps[k-1], cps[k]
		if a.Size == 0 || a.Size == b.Size {
			continue
		}
		p, err := pb.ConsistencyProof(ctx, a.Size, b.Size)
		if err != nil {
			return nil, badCheckpoint(b.N, "consistency proof from size %d: %v", a.Size, err)
		}
		if err := proof.VerifyConsistency(rfc6962.DefaultHasher, a.Size, b.Size, p, a.Hash, b.Hash); err != nil {
			return nil, badCheckpoint(b.N, "not consistent with checkpoint #%d: %v", a.N, err)
		}
	}

	// Every tile, against the entries.
	if size > 0 {
		hasher := func(bundle []byte) ([][]byte, error) {
			var eb api.EntryBundle
			if err := eb.UnmarshalText(bundle); err != nil {
				return nil, err
			}
			out := make([][]byte, len(eb.Entries))
			for i, e := range eb.Entries {
				out[i] = rfc6962.DefaultHasher.HashLeaf(e)
			}
			return out, nil
		}
		// fsck checks the newest checkpoint with one verifier: one that
		// signed it.
		var primary note.Verifier
		for _, v := range verifiers {
			if signing.Verify(newest.Note, v) == nil {
				primary = v
				break
			}
		}
		if err := fsck.New(origin, primary, d, hasher, fsck.Opts{N: 2}).Check(ctx); err != nil {
			return nil, &VerifyError{Entry: -1, Checkpoint: -1, Reason: fmt.Sprintf("tiles: %v", err)}
		}
	}

	rep := &Report{Checkpoints: len(cps), Size: size, Root: newest.Hash, Unpublished: len(cps) - 1 - pub}
	if n, err := treeSize(dir); err == nil && n > size {
		rep.Uncovered = n - size
	}
	return rep, nil
}

// logOrigin is the origin of the log whose verifier keys are given: their
// common name.
func logOrigin(verifiers []note.Verifier) (string, error) {
	if len(verifiers) == 0 {
		return "", errors.New("audit: no verifier keys")
	}
	origin := verifiers[0].Name()
	for _, v := range verifiers[1:] {
		if v.Name() != origin {
			return "", fmt.Errorf("audit: the verifier keys name different logs (%q, %q): give the keys of one log", origin, v.Name())
		}
	}
	return origin, nil
}

// verifyNote checks that the note n carries a valid signature from every
// verifier (signing.Verify) and that all its signatures are in canonical
// base64, so that no byte of a stored checkpoint can change unnoticed
// (lenient base64 decoding ignores the padding bits of the last
// character).
func verifyNote(n []byte, verifiers []note.Verifier) error {
	if err := verifyByType(n, verifiers); err != nil {
		return fmt.Errorf("signature: %w", err)
	}
	return signing.CheckCanonical(n)
}

// verifyByType checks that n is signed by every verifier, except that
// verifiers of one known signature type (from ParseVerifiers) are
// alternatives: one valid signature per type suffices.
func verifyByType(n []byte, verifiers []note.Verifier) error {
	groups := map[byte][]note.Verifier{}
	var plain []note.Verifier
	for _, v := range verifiers {
		if tv, ok := v.(typedVerifier); ok && tv.typ != 0 {
			groups[tv.typ] = append(groups[tv.typ], v)
		} else {
			plain = append(plain, v)
		}
	}
	if len(plain) > 0 {
		if err := signing.Verify(n, plain...); err != nil {
			return err
		}
	}
	for typ, vs := range groups {
		var first error
		ok := false
		for _, v := range vs {
			err := signing.Verify(n, v)
			if err == nil {
				ok = true
				break
			}
			var inv *note.InvalidSignatureError
			if errors.As(err, &inv) {
				return err // a signature claiming a given key fails
			}
			if first == nil {
				first = err
			}
		}
		if !ok {
			return fmt.Errorf("no valid signature by a key of type %#02x: %w", typ, first)
		}
	}
	return nil
}

// treeSize reads the integrated size of the tree from tessera's POSIX
// state file (.state/treeState, private to tessera v1.0.x: used only to
// report entries not yet covered by a checkpoint).
func treeSize(dir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, TreeDir, ".state", "treeState"))
	if err != nil {
		return 0, err
	}
	var st struct {
		Size uint64 `json:"size"`
	}
	err = json.Unmarshal(b, &st)
	return st.Size, err
}

// Entries yields the log's entries from index from, up to (not including)
// index to or the newest published checkpoint's size, whichever is
// smaller, each with its Seq set to its index. Signatures are not checked
// (see Verify).
func Entries(ctx context.Context, dir string, from, to uint64) iter.Seq2[*Entry, error] {
	return func(yield func(*Entry, error) bool) {
		d := dirReader{filepath.Join(dir, TreeDir)}
		raw, err := d.ReadCheckpoint(ctx)
		if err != nil {
			yield(nil, fmt.Errorf("audit: read the checkpoint: %w", err))
			return
		}
		cp, err := parseCheckpointText(raw)
		if err != nil {
			yield(nil, err)
			return
		}
		to = min(to, cp.Size)
		if from >= to {
			return
		}
		getSize := func(context.Context) (uint64, error) { return cp.Size, nil }
		for b, err := range client.EntryBundles(ctx, 1, getSize, d.ReadEntryBundle, from, to-from) {
			if err != nil {
				yield(nil, err)
				return
			}
			var eb api.EntryBundle
			if err := eb.UnmarshalText(b.Data); err != nil {
				yield(nil, fmt.Errorf("audit: malformed entry bundle %d: %w", b.RangeInfo.Index, err))
				return
			}
			if int(b.RangeInfo.First)+int(b.RangeInfo.N) > len(eb.Entries) {
				yield(nil, fmt.Errorf("audit: entry bundle %d is short", b.RangeInfo.Index))
				return
			}
			for _, data := range eb.Entries[b.RangeInfo.First : b.RangeInfo.First+b.RangeInfo.N] {
				if from >= to {
					// tessera v1.0.4's EntryBundles may run past N when
					// from > 0.
					return
				}
				e, err := ParseEntry(data)
				if err == nil {
					e.Seq = from
				}
				from++
				if !yield(e, err) || err != nil {
					return
				}
			}
		}
	}
}

// Proof is an inclusion proof of one entry in the newest checkpoint.
type Proof struct {
	Index      uint64   `json:"index"`
	TreeSize   uint64   `json:"tree_size"`
	LeafHash   []byte   `json:"leaf_hash"`
	Root       []byte   `json:"root"`
	Hashes     [][]byte `json:"proof"`
	Entry      string   `json:"entry"`
	Checkpoint string   `json:"checkpoint"`
}

// Prove returns the inclusion proof of entry index in the newest published
// checkpoint, which must verify as for Verify; the proof is checked
// before it is returned.
func Prove(ctx context.Context, dir string, index uint64, verifiers []note.Verifier) (*Proof, error) {
	d := dirReader{filepath.Join(dir, TreeDir)}
	raw, err := d.ReadCheckpoint(ctx)
	if err != nil {
		return nil, fmt.Errorf("audit: read the checkpoint: %w", err)
	}
	origin, err := logOrigin(verifiers)
	if err != nil {
		return nil, err
	}
	if err := verifyNote(raw, verifiers); err != nil {
		return nil, fmt.Errorf("audit: the published checkpoint: %w", err)
	}
	cp, err := parseCheckpointText(raw)
	if err != nil {
		return nil, err
	}
	if cp.Origin != origin {
		return nil, fmt.Errorf("audit: the published checkpoint is of log %q, not %q", cp.Origin, origin)
	}
	if index >= cp.Size {
		return nil, fmt.Errorf("audit: entry %d is not in the newest checkpoint (size %d)", index, cp.Size)
	}
	b, err := client.GetEntryBundle(ctx, d.ReadEntryBundle, index/256, cp.Size)
	if err != nil {
		return nil, err
	}
	if int(index%256) >= len(b.Entries) {
		return nil, fmt.Errorf("audit: entry %d missing from its bundle", index)
	}
	data := b.Entries[index%256]
	if _, err := ParseEntry(data); err != nil {
		return nil, fmt.Errorf("audit: entry %d is malformed (run hsmd audit verify)", index)
	}
	pb, err := client.NewProofBuilder(ctx, cp.Size, d.ReadTile)
	if err != nil {
		return nil, err
	}
	hashes, err := pb.InclusionProof(ctx, index)
	if err != nil {
		return nil, err
	}
	leaf := rfc6962.DefaultHasher.HashLeaf(data)
	if err := proof.VerifyInclusion(rfc6962.DefaultHasher, index, cp.Size, leaf, hashes, cp.Hash); err != nil {
		return nil, fmt.Errorf("audit: entry %d: %w", index, err)
	}
	return &Proof{Index: index, TreeSize: cp.Size, LeafHash: leaf, Root: cp.Hash, Hashes: hashes,
		Entry: string(data), Checkpoint: string(raw)}, nil
}
