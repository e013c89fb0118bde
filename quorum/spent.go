package quorum

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/hsmd/hsmd/internal/fsutil"
)

// SpentRetention is how long FileSpent keeps a nonce after its request
// expired. Verify refuses expired requests, so only a clock set back by
// more than this could let a pruned nonce be used again.
const SpentRetention = 24 * time.Hour

const (
	spentVersion    = 1
	maxSpentFile    = 64 << 20
	maxNonceHexSize = 128
)

// FileSpent is a Spent kept in a JSON file, rewritten atomically (temp
// file, fsync, rename, fsync of the directory) on each Spend, so a nonce
// it accepted survives a crash and a restart. Entries more than
// SpentRetention past their expiry are pruned.
//
// It is safe for concurrent use, also by several processes on one host:
// Spend holds an exclusive flock on path+".lock" (on Unix) while it reads
// and rewrites the file. The zero value is not usable; call NewFileSpent.
type FileSpent struct {
	path string
	now  func() time.Time
	mu   sync.Mutex
}

var _ Spent = (*FileSpent)(nil)

// spentFile is the file format.
type spentFile struct {
	Version int                  `json:"version"`
	Spent   map[string]time.Time `json:"spent"` // nonce -> request expiry
}

// NewFileSpent returns a FileSpent stored at path. The file is created by
// the first Spend; it and its directory must be writable then.
func NewFileSpent(path string) *FileSpent {
	return &FileSpent{path: path, now: time.Now}
}

// Spend records nonce as used until expires. It returns ErrReplayed if the
// nonce is already recorded, ErrExpired if expires is not after now (such
// a nonce would be pruned at once, and Verify refuses it anyway), the
// context's error if ctx is done when it is called (waiting for the lock
// is not bounded by ctx), and file errors otherwise; on any error the
// nonce must not be acted on.
func (f *FileSpent) Spend(ctx context.Context, nonce string, expires time.Time) error {
	if b, err := hex.DecodeString(nonce); err != nil || len(b) == 0 || len(nonce) > maxNonceHexSize {
		return fmt.Errorf("quorum: spend: nonce must be 1-%d hex digits", maxNonceHexSize)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("quorum: spend: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	unlock, err := lockFile(f.path + ".lock")
	if err != nil {
		return fmt.Errorf("quorum: spend: locking: %w", err)
	}
	defer unlock()

	now := f.now()
	if !expires.After(now) {
		return fmt.Errorf("%w at %s", ErrExpired, fmtTime(expires))
	}
	st, err := f.load()
	if err != nil {
		return err
	}
	for n, exp := range st.Spent {
		if now.Sub(exp) > SpentRetention {
			delete(st.Spent, n)
		}
	}
	if _, dup := st.Spent[nonce]; dup {
		return fmt.Errorf("%w: nonce %s", ErrReplayed, nonce)
	}
	st.Spent[nonce] = expires.UTC()
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("quorum: spend: %w", err)
	}
	if err := fsutil.WriteFileAtomic(f.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("quorum: spend: writing %s: %w", f.path, err)
	}
	return nil
}

// load reads the file strictly; a missing file is an empty record.
func (f *FileSpent) load() (*spentFile, error) {
	st := &spentFile{Version: spentVersion, Spent: map[string]time.Time{}}
	fh, err := os.Open(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("quorum: spend: %w", err)
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxSpentFile+1))
	if err != nil {
		return nil, fmt.Errorf("quorum: spend: reading %s: %w", f.path, err)
	}
	if len(b) > maxSpentFile {
		return nil, fmt.Errorf("quorum: spend: %s is over %d bytes", f.path, maxSpentFile)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(st); err != nil {
		return nil, fmt.Errorf("quorum: spend: %s: %w", f.path, err)
	}
	if st.Version != spentVersion {
		return nil, fmt.Errorf("quorum: spend: %s: version %d, want %d", f.path, st.Version, spentVersion)
	}
	if st.Spent == nil {
		st.Spent = map[string]time.Time{}
	}
	return st, nil
}
