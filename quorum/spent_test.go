package quorum

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestFileSpent(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "spent.json")
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	open := func() *FileSpent {
		s := NewFileSpent(path)
		s.now = func() time.Time { return now }
		return s
	}
	s := open()
	if err := s.Spend(ctx, "aa01", now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Spend(ctx, "aa01", now.Add(time.Hour)); !errors.Is(err, ErrReplayed) {
		t.Fatalf("again: %v, want ErrReplayed", err)
	}
	if err := open().Spend(ctx, "aa01", now.Add(time.Hour)); !errors.Is(err, ErrReplayed) {
		t.Fatalf("after reopening: %v, want ErrReplayed", err)
	}
	if err := s.Spend(ctx, "bb02", now); !errors.Is(err, ErrExpired) {
		t.Fatalf("expired: %v, want ErrExpired", err)
	}
	if err := s.Spend(ctx, "not hex", now.Add(time.Hour)); err == nil {
		t.Fatal("accepted a nonce that is not hex")
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file mode: %v, %v", fi, err)
	}

	// Kept for SpentRetention after expiry, then pruned.
	now = now.Add(time.Hour + SpentRetention)
	if err := open().Spend(ctx, "cc03", now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := spentNonces(t, path); len(got) != 2 {
		t.Fatalf("before pruning: %v", got)
	}
	now = now.Add(time.Second)
	if err := open().Spend(ctx, "dd04", now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := spentNonces(t, path); len(got) != 2 || got["aa01"] || !got["cc03"] {
		t.Fatalf("after pruning: %v, want cc03 and dd04", got)
	}

	if err := os.WriteFile(path, []byte(`{"version":1,"spent":{},"extra":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := open().Spend(ctx, "ee05", now.Add(time.Hour)); err == nil {
		t.Fatal("accepted a file with an unknown field")
	}
}

func spentNonces(t *testing.T, path string) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f spentFile
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for n := range f.Spent {
		out[n] = true
	}
	return out
}

// TestFileSpentConcurrent: of many concurrent spends of one nonce, through
// separate FileSpents on one file (as separate processes would be, each
// with its own mutex), exactly one succeeds.
func TestFileSpentConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "spent.json")
	const n = 16
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		for _, nonce := range []string{"ab", fmt.Sprintf("%04x", i)} {
			wg.Go(func() { errs <- NewFileSpent(path).Spend(context.Background(), nonce, time.Now().Add(time.Hour)) })
		}
	}
	wg.Wait()
	close(errs)
	ok, replayed := 0, 0
	for err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, ErrReplayed):
			replayed++
		default:
			t.Error(err)
		}
	}
	if ok != n+1 || replayed != n-1 {
		t.Fatalf("%d spent, %d replayed; want %d and %d", ok, replayed, n+1, n-1)
	}
	if got := spentNonces(t, path); len(got) != n+1 {
		t.Fatalf("%d nonces on disk, want %d", len(got), n+1)
	}
}
