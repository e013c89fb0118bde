package storetest

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"hash"
	"testing"

	"github.com/hsmd/hsmd/store"
)

// HMACSealer is a store.Sealer with a key in memory, for tests.
type HMACSealer []byte

// NewMAC implements store.Sealer.
func (k HMACSealer) NewMAC() hash.Hash { return hmac.New(sha256.New, k) }

// MAC implements store.Sealer.
func (k HMACSealer) MAC(msg []byte) [32]byte {
	m := hmac.New(sha256.New, k)
	m.Write(msg)
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// SealedFactory opens the sealed store kept under dir (creating an empty
// one the first time) with the sealer s, or calls t.Fatal.
type SealedFactory func(t *testing.T, dir string, s store.Sealer) store.Sealed

// RunSealed is the conformance suite of store.Sealed: sealing, binding the
// counter, verifying after writes and after a reopen, and refusing another
// key. Tampering with the stored bytes is backend-specific and left to the
// backend's own tests.
func RunSealed(t *testing.T, open SealedFactory) {
	key, other := HMACSealer("0123456789abcdef0123456789abcdef"), HMACSealer("another key, another machine....")
	ctx := context.Background()
	t.Run("lifecycle", func(t *testing.T) {
		dir := t.TempDir()
		s := open(t, dir, key)
		if _, err := s.Verify(ctx); !errors.Is(err, store.ErrNotSealed) {
			t.Fatalf("verify of a new store: %v, want ErrNotSealed", err)
		}
		a := newTenant(t, "acme")
		if err := s.CreateTenant(ctx, a); err != nil {
			t.Fatal(err)
		}
		if err := s.Reseal(ctx, 1); err != nil {
			t.Fatal(err)
		}
		checkState(t, s, 1)
		for _, name := range []string{"b", "c"} {
			if err := s.CreateTenant(ctx, newTenant(t, name)); err != nil {
				t.Fatal(err)
			}
		}
		a.Current = 1
		if err := s.UpdateTenant(ctx, a); err != nil {
			t.Fatal(err)
		}
		checkState(t, s, 1)
		b, err := s.GetTenant(ctx, "b")
		if err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteTenant(ctx, "b", b.Revision); err != nil {
			t.Fatal(err)
		}
		checkState(t, s, 1)
		if err := s.SetCounter(ctx, 7); err != nil {
			t.Fatal(err)
		}
		checkState(t, s, 7)
		s.Close()
		s = open(t, dir, key)
		checkState(t, s, 7)
		s.Close()
		s = open(t, dir, other)
		if _, err := s.Verify(ctx); !errors.Is(err, store.ErrTampered) {
			t.Fatalf("verify with another key: %v, want ErrTampered", err)
		}
		if err := s.SetCounter(ctx, 8); !errors.Is(err, store.ErrTampered) {
			t.Fatalf("set counter with another key: %v, want ErrTampered", err)
		}
		s.Close()
	})
}

func checkState(t *testing.T, s store.Sealed, counter uint64) {
	t.Helper()
	st, err := s.Verify(context.Background())
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	if st.Counter != counter {
		t.Fatalf("counter %d, want %d", st.Counter, counter)
	}
}
