package audit

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera/api/layout"
	"github.com/transparency-dev/tessera/client"
)

// dirReader reads a tessera POSIX log's resources from its directory, as
// the tlog-tiles HTTP API would serve them.
type dirReader struct{ root string }

func (d dirReader) ReadCheckpoint(context.Context) ([]byte, error) {
	return os.ReadFile(filepath.Join(d.root, layout.CheckpointPath))
}

func (d dirReader) ReadTile(_ context.Context, level, index uint64, p uint8) ([]byte, error) {
	return partialOrFull(p, func(p uint8) string { return layout.TilePath(level, index, p) }, d.root)
}

func (d dirReader) ReadEntryBundle(_ context.Context, index uint64, p uint8) ([]byte, error) {
	return partialOrFull(p, func(p uint8) string { return layout.EntriesPath(index, p) }, d.root)
}

// partialOrFull reads the partial resource of width p, or the full one if
// the tree grew past it meanwhile.
func partialOrFull(p uint8, path func(uint8) string, root string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(root, path(p)))
	if errors.Is(err, os.ErrNotExist) && p > 0 {
		b, err = os.ReadFile(filepath.Join(root, path(0)))
	}
	return b, err
}

var rangeFactory = compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}

// rootAt computes the root hash of the first size leaves from the tiles.
func rootAt(ctx context.Context, d dirReader, size uint64) ([]byte, error) {
	if size == 0 {
		r := rfc6962.DefaultHasher.EmptyRoot()
		return r[:], nil
	}
	nodes, err := client.FetchRangeNodes(ctx, size, d.ReadTile)
	if err != nil {
		return nil, fmt.Errorf("audit: read the tree at size %d: %w", size, err)
	}
	r, err := rangeFactory.NewRange(0, size, nodes)
	if err != nil {
		return nil, fmt.Errorf("audit: read the tree at size %d: %w", size, err)
	}
	return r.GetRootHash(nil)
}

// Head returns the size and root hash of the entries durably in the log,
// computed from its tiles.
func (l *Log) Head(ctx context.Context) (size uint64, root []byte, err error) {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	size = l.size.Load()
	root, err = rootAt(ctx, dirReader{l.treeDir}, size)
	return size, root, err
}
