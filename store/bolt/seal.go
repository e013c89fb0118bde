package bolt

import (
	"context"
	"crypto/subtle"
	"fmt"

	"github.com/hsmd/hsmd/store"
	bbolt "go.etcd.io/bbolt"
)

var _ store.Sealed = (*Store)(nil)

const kindTenant = "tenant"

// sealWrite, in the transaction that replaces the tenant record old (nil
// for a new tenant) by new, updates the record's MAC and the sealed state.
// It does nothing for a store opened without a Sealer.
func (s *Store) sealWrite(tx *bbolt.Tx, name string, old, new []byte) error {
	if s.sealer == nil {
		return nil
	}
	st, err := s.readState(tx)
	if err != nil {
		return err
	}
	if old != nil {
		st.Fold(store.RecordMAC(s.sealer, kindTenant, name, old))
	}
	mac := store.RecordMAC(s.sealer, kindTenant, name, new)
	st.Fold(mac)
	if err := tx.Bucket(bucketMACs).Put([]byte(name), mac[:]); err != nil {
		return err
	}
	return tx.Bucket(bucketMeta).Put(keyState, store.EncodeState(s.sealer, st))
}

// sealDelete, in the transaction that deletes the tenant record old, folds
// its MAC out of the sealed state.
func (s *Store) sealDelete(tx *bbolt.Tx, name string, old []byte) error {
	if s.sealer == nil {
		return nil
	}
	st, err := s.readState(tx)
	if err != nil {
		return err
	}
	st.Fold(store.RecordMAC(s.sealer, kindTenant, name, old))
	if err := tx.Bucket(bucketMACs).Delete([]byte(name)); err != nil {
		return err
	}
	return tx.Bucket(bucketMeta).Put(keyState, store.EncodeState(s.sealer, st))
}

// readState returns the verified sealed state, or the zero State of a store
// that was never sealed.
func (s *Store) readState(tx *bbolt.Tx) (store.State, error) {
	raw := tx.Bucket(bucketMeta).Get(keyState)
	if raw == nil {
		return store.State{}, nil
	}
	return store.DecodeState(s.sealer, raw)
}

func (s *Store) needSealer(op string) error {
	if s.sealer == nil {
		return fmt.Errorf("bolt: %s: the store was opened without a Sealer", op)
	}
	return nil
}

// Verify implements store.Sealed: it recomputes every tenant record's MAC,
// names the first record that differs, and checks the digest of all of them
// against the sealed state.
func (s *Store) Verify(ctx context.Context) (store.State, error) {
	if err := ctx.Err(); err != nil {
		return store.State{}, err
	}
	if err := s.needSealer("verify"); err != nil {
		return store.State{}, err
	}
	var st store.State
	err := s.view(func(tx *bbolt.Tx) error {
		raw := tx.Bucket(bucketMeta).Get(keyState)
		if raw == nil {
			return store.ErrNotSealed
		}
		var err error
		if st, err = store.DecodeState(s.sealer, raw); err != nil {
			return err
		}
		return s.verifyRecords(tx, st)
	})
	return st, err
}

func (s *Store) verifyRecords(tx *bbolt.Tx, st store.State) error {
	var digest store.State
	macs := tx.Bucket(bucketMACs)
	err := tx.Bucket(bucketTenants).ForEach(func(k, v []byte) error {
		mac := store.RecordMAC(s.sealer, kindTenant, string(k), v)
		if subtle.ConstantTimeCompare(mac[:], macs.Get(k)) != 1 {
			return fmt.Errorf("%w: tenant %q: its record was changed or added outside hsmd", store.ErrTampered, k)
		}
		digest.Fold(mac)
		return nil
	})
	if err != nil {
		return err
	}
	if err := macs.ForEach(func(k, _ []byte) error {
		if tx.Bucket(bucketTenants).Get(k) == nil {
			return fmt.Errorf("%w: tenant %q: its record was removed outside hsmd", store.ErrTampered, k)
		}
		return nil
	}); err != nil {
		return err
	}
	if digest.Digest != st.Digest {
		return fmt.Errorf("%w: the records do not add up to the sealed digest: some were restored from another copy of the data directory", store.ErrTampered)
	}
	return nil
}

// Reseal implements store.Sealed.
func (s *Store) Reseal(ctx context.Context, counter uint64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.needSealer("reseal"); err != nil {
		return err
	}
	return s.update(func(tx *bbolt.Tx) error {
		st := store.State{Counter: counter}
		macs := tx.Bucket(bucketMACs)
		err := tx.Bucket(bucketTenants).ForEach(func(k, v []byte) error {
			mac := store.RecordMAC(s.sealer, kindTenant, string(k), v)
			st.Fold(mac)
			return macs.Put(k, mac[:])
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyState, store.EncodeState(s.sealer, st))
	})
}

// SetCounter implements store.Sealed.
func (s *Store) SetCounter(ctx context.Context, counter uint64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.needSealer("set counter"); err != nil {
		return err
	}
	return s.update(func(tx *bbolt.Tx) error {
		raw := tx.Bucket(bucketMeta).Get(keyState)
		if raw == nil {
			return store.ErrNotSealed
		}
		st, err := store.DecodeState(s.sealer, raw)
		if err != nil {
			return err
		}
		st.Counter = counter
		return tx.Bucket(bucketMeta).Put(keyState, store.EncodeState(s.sealer, st))
	})
}
