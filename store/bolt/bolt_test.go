package bolt_test

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
	"github.com/hsmd/hsmd/store/storetest"
	bbolt "go.etcd.io/bbolt"
)

func openT(t *testing.T, path string, opts bolt.Options) *bolt.Store {
	t.Helper()
	s, err := bolt.Open(path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, storetest.FactoryFunc(func(t *testing.T, dir string) store.Store {
		return openT(t, filepath.Join(dir, "hsmd.db"), bolt.Options{})
	}))
}

func TestFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hsmd.db")
	openT(t, path, bolt.Options{})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("file mode = %o, want 600", mode)
	}
}

func TestLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hsmd.db")
	openT(t, path, bolt.Options{})
	for _, tc := range []struct {
		opts bolt.Options
		want time.Duration
	}{
		{bolt.Options{LockTimeout: 200 * time.Millisecond}, 200 * time.Millisecond},
		{bolt.Options{}, bolt.DefaultLockTimeout},
	} {
		start := time.Now()
		s, err := bolt.Open(path, tc.opts)
		took := time.Since(start)
		if err == nil {
			s.Close()
			t.Fatalf("second Open of a locked file succeeded")
		}
		if !errors.Is(err, bolt.ErrLocked) {
			t.Errorf("second Open: err = %v, want ErrLocked", err)
		}
		if !strings.Contains(err.Error(), path) {
			t.Errorf("error %q does not name the file", err)
		}
		if took > tc.want+time.Second {
			t.Errorf("second Open took %v, want about %v", took, tc.want)
		}
	}
	if _, err := bolt.Open(path, bolt.Options{LockTimeout: -1}); err == nil || errors.Is(err, bolt.ErrLocked) {
		t.Errorf("Open with a negative timeout: err = %v, want a configuration error", err)
	}
}

func TestLockReleasedByClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hsmd.db")
	s, err := bolt.Open(path, bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	openT(t, path, bolt.Options{LockTimeout: 100 * time.Millisecond})
}

// rawUpdate edits the bbolt file at path directly.
func rawUpdate(t *testing.T, path string, fn func(tx *bbolt.Tx) error) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func TestNewerVersionRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hsmd.db")
	s := openT(t, path, bolt.Options{})
	s.Close()
	rawUpdate(t, path, func(tx *bbolt.Tx) error {
		v := binary.BigEndian.AppendUint64(nil, bolt.FormatVersion+1)
		return tx.Bucket([]byte("meta")).Put([]byte("version"), v)
	})
	s, err := bolt.Open(path, bolt.Options{})
	if err == nil {
		s.Close()
		t.Fatal("Open of a newer format succeeded")
	}
	if !errors.Is(err, bolt.ErrVersion) {
		t.Errorf("Open of a newer format: err = %v, want ErrVersion", err)
	}
	if !strings.Contains(err.Error(), "format version 2") {
		t.Errorf("error %q does not name the version", err)
	}
}

func TestNotAStore(t *testing.T) {
	for name, fn := range map[string]func(tx *bbolt.Tx) error{
		"foreign bucket": func(tx *bbolt.Tx) error {
			_, err := tx.CreateBucket([]byte("something-else"))
			return err
		},
		"no version": func(tx *bbolt.Tx) error {
			_, err := tx.CreateBucket([]byte("meta"))
			return err
		},
	} {
		path := filepath.Join(t.TempDir(), "other.db")
		rawUpdate(t, path, fn)
		s, err := bolt.Open(path, bolt.Options{})
		if err == nil {
			s.Close()
			t.Errorf("%s: Open succeeded", name)
			continue
		}
		if !errors.Is(err, bolt.ErrFormat) {
			t.Errorf("%s: err = %v, want ErrFormat", name, err)
		}
	}
}

func TestMissingDirectory(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent", "hsmd.db")
	if s, err := bolt.Open(path, bolt.Options{}); err == nil {
		s.Close()
		t.Fatal("Open in a missing directory succeeded")
	} else if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("err = %v, want os.ErrNotExist", err)
	}
}
