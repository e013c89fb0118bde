package bolt

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"

	"github.com/hsmd/hsmd/store"
	bbolt "go.etcd.io/bbolt"
)

var _ store.Store = (*Store)(nil)

var errClosed = fmt.Errorf("bolt: %w", store.ErrClosed)

// maxListPrealloc caps the slice ListTenants allocates up front, so a huge
// limit costs nothing until tenants are actually found.
const maxListPrealloc = 1024

// record is the stored form of a tenant (see the package doc).
type record struct {
	Revision uint64        `json:"revision"`
	Tenant   *store.Tenant `json:"tenant"`
}

// encode returns the stored form of t at revision rev, with every time in
// UTC. It does not modify t.
func encode(t *store.Tenant, rev uint64) ([]byte, error) {
	c := *t
	c.CreateTime = c.CreateTime.UTC()
	c.Versions = make([]store.KeyVersion, len(t.Versions))
	for i, kv := range t.Versions {
		kv.CreateTime = kv.CreateTime.UTC()
		if !kv.DestroyTime.IsZero() {
			kv.DestroyTime = kv.DestroyTime.UTC()
		}
		c.Versions[i] = kv
	}
	return json.Marshal(record{Revision: rev, Tenant: &c})
}

// legacyRecord reads the tenant-wide salt of records written before each
// key version had its own: it becomes version 1's.
type legacyRecord struct {
	Tenant struct {
		Salt *[store.SaltSize]byte `json:"salt"`
	} `json:"tenant"`
}

// decode parses a stored record into a new Tenant that shares no memory
// with buf.
func decode(name, buf []byte) (*store.Tenant, error) {
	var r record
	if err := json.Unmarshal(buf, &r); err != nil {
		return nil, fmt.Errorf("bolt: decode tenant %q: %w", name, err)
	}
	if r.Tenant == nil || r.Tenant.Name != string(name) || r.Revision == 0 {
		return nil, fmt.Errorf("bolt: decode tenant %q: malformed record", name)
	}
	if len(r.Tenant.Versions) > 0 && r.Tenant.Versions[0].Version == 1 && r.Tenant.Versions[0].Salt == nil &&
		r.Tenant.Versions[0].State != store.StateDestroyed {
		var l legacyRecord
		if json.Unmarshal(buf, &l) == nil && l.Tenant.Salt != nil {
			r.Tenant.Versions[0].Salt = l.Tenant.Salt[:]
		}
	}
	r.Tenant.Revision = r.Revision
	return r.Tenant, nil
}

func idKey(id uint64) []byte { return binary.BigEndian.AppendUint64(nil, id) }

// CreateTenant writes t after t.Validate and sets t.Revision to 1. It returns
// an error wrapping store.ErrInvalid if t is nil or invalid, store.ErrExists
// if the name or the ID is taken, store.ErrClosed after Close, or ctx.Err()
// if ctx is done when it is called. Nothing is written on error. The store
// keeps no reference to t. Safe for concurrent use.
func (s *Store) CreateTenant(ctx context.Context, t *store.Tenant) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if t == nil {
		return fmt.Errorf("bolt: create tenant: %w: nil tenant", store.ErrInvalid)
	}
	if err := t.Validate(); err != nil {
		return fmt.Errorf("bolt: create tenant: %w", err)
	}
	const rev = 1
	val, err := encode(t, rev)
	if err != nil {
		return fmt.Errorf("bolt: create tenant %q: %w", t.Name, err)
	}
	err = s.update(func(tx *bbolt.Tx) error {
		tenants, ids := tx.Bucket(bucketTenants), tx.Bucket(bucketIDs)
		name, id := []byte(t.Name), idKey(t.ID)
		if tenants.Get(name) != nil {
			return fmt.Errorf("bolt: create tenant %q: %w", t.Name, store.ErrExists)
		}
		if ids.Get(id) != nil {
			return fmt.Errorf("bolt: create tenant %q: id %d: %w", t.Name, t.ID, store.ErrExists)
		}
		if err := tenants.Put(name, val); err != nil {
			return err
		}
		if err := ids.Put(id, name); err != nil {
			return err
		}
		if err := s.sealWrite(tx, t.Name, val); err != nil {
			return err
		}
		return s.sealState(tx)
	})
	if err != nil {
		return err
	}
	t.Revision = rev
	return nil
}

// GetTenant returns a copy of the tenant named name, with its revision. It
// returns an error wrapping store.ErrNotFound if there is none,
// store.ErrClosed after Close, or ctx.Err() if ctx is done when it is called.
// Safe for concurrent use.
func (s *Store) GetTenant(ctx context.Context, name string) (*store.Tenant, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var t *store.Tenant
	err := s.view(func(tx *bbolt.Tx) error {
		var err error
		t, err = getByName(tx, []byte(name))
		return err
	})
	return t, err
}

// GetTenantByID is GetTenant, looking the tenant up by ID.
func (s *Store) GetTenantByID(ctx context.Context, id uint64) (*store.Tenant, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var t *store.Tenant
	err := s.view(func(tx *bbolt.Tx) error {
		name := tx.Bucket(bucketIDs).Get(idKey(id))
		if name == nil {
			return fmt.Errorf("bolt: tenant id %d: %w", id, store.ErrNotFound)
		}
		var err error
		if t, err = getByName(tx, name); err != nil {
			return err
		}
		if t.ID != id {
			return fmt.Errorf("bolt: tenant id %d: index names %q, whose id is %d", id, name, t.ID)
		}
		return nil
	})
	return t, err
}

func getByName(tx *bbolt.Tx, name []byte) (*store.Tenant, error) {
	val := tx.Bucket(bucketTenants).Get(name)
	if val == nil {
		return nil, fmt.Errorf("bolt: tenant %q: %w", name, store.ErrNotFound)
	}
	return decode(name, val)
}

// ListTenants returns copies of up to limit tenants whose names sort after
// `after` (byte-wise, which for valid names is Go string order), in that
// order. It returns an empty slice when there are none. Start with after ==
// "" and pass the last name of each page to get the next. It returns an
// error wrapping store.ErrInvalid if limit < 1, store.ErrClosed after Close,
// or ctx.Err() if ctx is done when it is called. Each page is a consistent
// snapshot; pages are not a snapshot of each other. Safe for concurrent use.
func (s *Store) ListTenants(ctx context.Context, after string, limit int) ([]*store.Tenant, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if limit < 1 {
		return nil, fmt.Errorf("bolt: list tenants: %w: limit %d is not positive", store.ErrInvalid, limit)
	}
	out := make([]*store.Tenant, 0, min(limit, maxListPrealloc))
	err := s.view(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketTenants).Cursor()
		k, v := c.Seek([]byte(after))
		if k != nil && string(k) == after {
			k, v = c.Next()
		}
		for ; k != nil && len(out) < limit; k, v = c.Next() {
			t, err := decode(k, v)
			if err != nil {
				return err
			}
			out = append(out, t)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// UpdateTenant replaces the record named t.Name with t if the stored
// revision is still t.Revision, and sets t.Revision to the new revision. It
// returns an error wrapping store.ErrInvalid if t is nil or invalid or its ID
// differs from the stored one, store.ErrNotFound if there is no such tenant,
// store.ErrConflict if the revision is stale (re-read and retry),
// store.ErrClosed after Close, or ctx.Err() if ctx is done when it is called.
// Nothing is written on error. Safe for concurrent use: of several updates
// from the same revision, exactly one succeeds.
func (s *Store) UpdateTenant(ctx context.Context, t *store.Tenant) error {
	return s.UpdateTenants(ctx, []*store.Tenant{t})
}

// UpdateTenants implements store.Store: UpdateTenant for many tenants in
// one transaction (one fsync), all or nothing.
func (s *Store) UpdateTenants(ctx context.Context, ts []*store.Tenant) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	vals := make([][]byte, len(ts))
	for i, t := range ts {
		if t == nil {
			return fmt.Errorf("bolt: update tenant: %w: nil tenant", store.ErrInvalid)
		}
		if err := t.Validate(); err != nil {
			return fmt.Errorf("bolt: update tenant: %w", err)
		}
		var err error
		if vals[i], err = encode(t, t.Revision+1); err != nil {
			return fmt.Errorf("bolt: update tenant %q: %w", t.Name, err)
		}
	}
	err := s.update(func(tx *bbolt.Tx) error {
		for i, t := range ts {
			if err := s.updateOne(tx, t, vals[i]); err != nil {
				return err
			}
		}
		return s.sealState(tx)
	})
	if err != nil {
		return err
	}
	for _, t := range ts {
		t.Revision++
	}
	return nil
}

func (s *Store) updateOne(tx *bbolt.Tx, t *store.Tenant, val []byte) error {
	old, err := getByName(tx, []byte(t.Name))
	if err != nil {
		return err
	}
	if old.ID != t.ID {
		return fmt.Errorf("bolt: update tenant %q: %w: id cannot change", t.Name, store.ErrInvalid)
	}
	if old.Revision != t.Revision {
		return fmt.Errorf("bolt: update tenant %q: %w: revision %d, stored %d",
			t.Name, store.ErrConflict, t.Revision, old.Revision)
	}
	if err := s.sealWrite(tx, t.Name, val); err != nil {
		return err
	}
	return tx.Bucket(bucketTenants).Put([]byte(t.Name), val)
}

// DeleteTenant removes the record, its ID index entry and its MAC, if the
// stored revision is still revision. Errors: store.ErrNotFound,
// store.ErrConflict, store.ErrClosed, ctx.Err(). Safe for concurrent use.
func (s *Store) DeleteTenant(ctx context.Context, name string, revision uint64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.update(func(tx *bbolt.Tx) error {
		old, err := getByName(tx, []byte(name))
		if err != nil {
			return err
		}
		if old.Revision != revision {
			return fmt.Errorf("bolt: delete tenant %q: %w: revision %d, stored %d", name, store.ErrConflict, revision, old.Revision)
		}
		if err := s.sealDelete(tx, name); err != nil {
			return err
		}
		if err := tx.Bucket(bucketIDs).Delete(idKey(old.ID)); err != nil {
			return err
		}
		if err := tx.Bucket(bucketTenants).Delete([]byte(name)); err != nil {
			return err
		}
		return s.sealState(tx)
	})
}
