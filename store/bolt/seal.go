package bolt

import (
	"bytes"
	"context"
	"crypto/subtle"
	"fmt"

	"github.com/hsmd/hsmd/store"
	bbolt "go.etcd.io/bbolt"
)

var _ store.Sealed = (*Store)(nil)

const kindTenant = "tenant"

// sealWrite, in the transaction that writes a tenant record, stores the
// record's MAC. The transaction must end with sealState. It does nothing
// without a Sealer.
func (s *Store) sealWrite(tx *bbolt.Tx, name string, new []byte) error {
	if s.sealer == nil {
		return nil
	}
	mac := store.RecordMAC(s.sealer, kindTenant, name, new)
	return tx.Bucket(bucketMACs).Put([]byte(name), mac[:])
}

// sealDelete, in the transaction that deletes a tenant record, drops its
// MAC. The transaction must end with sealState.
func (s *Store) sealDelete(tx *bbolt.Tx, name string) error {
	if s.sealer == nil {
		return nil
	}
	return tx.Bucket(bucketMACs).Delete([]byte(name))
}

// sealState recomputes the digest over the stored MACs and writes the
// state, keeping its counter (zero for a store never sealed). It costs one
// pass over the MACs, so a transaction calls it once, after its writes. It
// does nothing without a Sealer.
func (s *Store) sealState(tx *bbolt.Tx) error {
	if s.sealer == nil {
		return nil
	}
	st := store.State{}
	if raw := tx.Bucket(bucketMeta).Get(keyState); raw != nil {
		var err error
		if st, err = store.DecodeState(s.sealer, raw); err != nil {
			return err
		}
	}
	d := store.NewDigester(s.sealer)
	if err := tx.Bucket(bucketMACs).ForEach(func(k, v []byte) error { d.Add(string(k), v); return nil }); err != nil {
		return err
	}
	st.Digest = d.Sum()
	return tx.Bucket(bucketMeta).Put(keyState, store.EncodeState(s.sealer, st))
}

func (s *Store) needSealer(op string) error {
	if s.sealer == nil {
		return fmt.Errorf("bolt: %s: the store was opened without a Sealer", op)
	}
	return nil
}

// Verify implements store.Sealed: it recomputes every tenant record's MAC,
// names the first record that differs, checks that the ID index is exactly
// the inverse of the records, and checks the digest of all of them against
// the sealed state.
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
	d := store.NewDigester(s.sealer)
	macs, ids := tx.Bucket(bucketMACs), tx.Bucket(bucketIDs)
	n := 0
	err := tx.Bucket(bucketTenants).ForEach(func(k, v []byte) error {
		mac := store.RecordMAC(s.sealer, kindTenant, string(k), v)
		if subtle.ConstantTimeCompare(mac[:], macs.Get(k)) != 1 {
			return fmt.Errorf("%w: tenant %q: its record was changed or added outside hsmd", store.ErrTampered, k)
		}
		t, err := decode(k, v)
		if err != nil {
			return err
		}
		if !bytes.Equal(ids.Get(idKey(t.ID)), k) {
			return fmt.Errorf("%w: tenant %q: its id index entry was changed outside hsmd", store.ErrTampered, k)
		}
		d.Add(string(k), mac[:])
		n++
		return nil
	})
	if err != nil {
		return err
	}
	if err := orphans(tx, macs, false); err != nil {
		return err
	}
	if err := orphans(tx, ids, true); err != nil {
		return err
	}
	if d.Sum() != st.Digest {
		return fmt.Errorf("%w: the records do not add up to the sealed digest: some were restored from another copy of the data directory", store.ErrTampered)
	}
	return nil
}

// orphans reports the first entry of b (MACs by name, or the id index,
// whose values are names) whose tenant record is gone.
func orphans(tx *bbolt.Tx, b *bbolt.Bucket, valueIsName bool) error {
	tenants := tx.Bucket(bucketTenants)
	return b.ForEach(func(k, v []byte) error {
		name := k
		if valueIsName {
			name = v
		}
		if tenants.Get(name) == nil {
			return fmt.Errorf("%w: tenant %q: its record was removed outside hsmd", store.ErrTampered, name)
		}
		return nil
	})
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
		macs := tx.Bucket(bucketMACs)
		err := tx.Bucket(bucketTenants).ForEach(func(k, v []byte) error {
			mac := store.RecordMAC(s.sealer, kindTenant, string(k), v)
			return macs.Put(k, mac[:])
		})
		if err != nil {
			return err
		}
		st := store.State{Counter: counter}
		tx.Bucket(bucketMeta).Put(keyState, store.EncodeState(s.sealer, st)) // sealState keeps the counter
		return s.sealState(tx)
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
