package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/hsmd/hsmd/store"
)

var _ store.Store = (*Store)(nil)

// maxListPrealloc caps the slice ListTenants allocates up front.
const maxListPrealloc = 1024

// maxNameLen is the longest valid tenant name (store.ValidateName).
const maxNameLen = 64

// record is the stored form of a tenant (see the package doc).
type record struct {
	Tenant *store.Tenant `json:"tenant"`
}

func (s *Store) tenantKey(name string) string { return s.TenantsPrefix() + name }

func (s *Store) idKey(id uint64) string {
	return s.idsPrefix() + fmt.Sprintf("%016x", id)
}

// modRevision returns the etcd mod revision a record must have for a store
// revision r to be current: -1, which no key has, if r cannot be one.
func modRevision(r uint64) int64 {
	if r == 0 || r > math.MaxInt64 {
		return -1
	}
	return int64(r)
}

// encode returns the stored form of t, with every time in UTC, or an error
// wrapping store.ErrInvalid if it is over MaxRecordSize. It does not
// modify t.
func encode(t *store.Tenant) ([]byte, error) {
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
	val, err := json.Marshal(record{Tenant: &c})
	if err != nil {
		return nil, err
	}
	if len(val) > MaxRecordSize {
		return nil, fmt.Errorf("%w: the record is %d bytes, over the limit of %d", store.ErrInvalid, len(val), MaxRecordSize)
	}
	return val, nil
}

// decode parses and validates the stored record kv of the tenant named
// name into a new Tenant whose revision is kv's mod revision. Its errors
// wrap store.ErrInvalid and quote none of the record.
func decode(name string, kv *mvccpb.KeyValue) (*store.Tenant, error) {
	if len(kv.Value) > MaxRecordSize {
		return nil, fmt.Errorf("etcd: tenant %q: %w: the record is %d bytes, over the limit of %d",
			name, store.ErrInvalid, len(kv.Value), MaxRecordSize)
	}
	var r record
	if err := json.Unmarshal(kv.Value, &r); err != nil {
		return nil, fmt.Errorf("etcd: tenant %q: %w: %s", name, store.ErrInvalid, jsonProblem(err))
	}
	if r.Tenant == nil || r.Tenant.Name != name {
		return nil, fmt.Errorf("etcd: tenant %q: %w: malformed record", name, store.ErrInvalid)
	}
	if err := r.Tenant.Validate(); err != nil {
		return nil, fmt.Errorf("etcd: tenant %q: stored record: %w", name, err)
	}
	r.Tenant.Revision = uint64(kv.ModRevision)
	return r.Tenant, nil
}

// jsonProblem describes a JSON decoding error without quoting the input
// (a salt is not a key, but it is not for error messages either).
func jsonProblem(err error) string {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntax):
		return "the record is not JSON (syntax error at byte " + strconv.FormatInt(syntax.Offset, 10) + ")"
	case errors.As(err, &typ):
		return "the record's field " + strconv.Quote(typ.Field) + " has the wrong type"
	}
	return "malformed record"
}

// CreateTenant writes t after t.Validate and sets t.Revision. It returns an
// error wrapping store.ErrInvalid if t is nil or invalid, store.ErrExists if
// the name or the ID is taken (by any client of the cluster: exactly one of
// several concurrent creations of a name succeeds), store.ErrClosed after
// Close, or a context or availability error (see the package doc). Nothing
// is written on error, unless the error is a context or availability error
// from a write that was sent. The store keeps no reference to t. Safe for
// concurrent use.
func (s *Store) CreateTenant(ctx context.Context, t *store.Tenant) error {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	if t == nil {
		return fmt.Errorf("etcd: create tenant: %w: nil tenant", store.ErrInvalid)
	}
	if err := t.Validate(); err != nil {
		return fmt.Errorf("etcd: create tenant: %w", err)
	}
	val, err := encode(t)
	if err != nil {
		return fmt.Errorf("etcd: create tenant %q: %w", t.Name, err)
	}
	tkey, ikey := s.tenantKey(t.Name), s.idKey(t.ID)
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(tkey), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(ikey), "=", 0)).
		Then(clientv3.OpPut(tkey, string(val)), clientv3.OpPut(ikey, t.Name)).
		Else(clientv3.OpGet(tkey, clientv3.WithCountOnly())).
		Commit()
	if err != nil {
		return s.fail(ctx, fmt.Sprintf("create tenant %q", t.Name), err)
	}
	if !resp.Succeeded {
		if resp.Responses[0].GetResponseRange().GetCount() > 0 {
			return fmt.Errorf("etcd: create tenant %q: %w", t.Name, store.ErrExists)
		}
		return fmt.Errorf("etcd: create tenant %q: id %d: %w", t.Name, t.ID, store.ErrExists)
	}
	t.Revision = uint64(resp.Header.Revision)
	s.wrote(resp.Header.Revision)
	return nil
}

// GetTenant returns a copy of the tenant named name, with its revision. It
// returns an error wrapping store.ErrNotFound if there is none (or name is
// not a valid name), store.ErrInvalid if the stored record is malformed,
// store.ErrClosed after Close, or a context or availability error (see the
// package doc). Safe for concurrent use.
func (s *Store) GetTenant(ctx context.Context, name string) (*store.Tenant, error) {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer end()
	if len(name) > maxNameLen || store.ValidateName(name) != nil {
		return nil, fmt.Errorf("etcd: get tenant: %w (not a valid name)", store.ErrNotFound)
	}
	resp, err := s.client.Get(ctx, s.tenantKey(name))
	if err != nil {
		return nil, s.fail(ctx, fmt.Sprintf("get tenant %q", name), err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("etcd: tenant %q: %w", name, store.ErrNotFound)
	}
	return decode(name, resp.Kvs[0])
}

// GetTenantByID is GetTenant, looking the tenant up by ID. It reads the ID
// index and the record at one revision; an index entry that names no
// record, or a record of another ID, is an error wrapping store.ErrInvalid.
func (s *Store) GetTenantByID(ctx context.Context, id uint64) (*store.Tenant, error) {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer end()
	for attempt := 1; ; attempt++ {
		t, err := s.getByID(ctx, id)
		// The second read is at the first's revision: if etcd compacted
		// it meanwhile, read both again.
		if errors.Is(err, rpctypes.ErrCompacted) && attempt < 3 {
			continue
		}
		return t, err
	}
}

func (s *Store) getByID(ctx context.Context, id uint64) (*store.Tenant, error) {
	what := fmt.Sprintf("get tenant id %d", id)
	resp, err := s.client.Get(ctx, s.idKey(id))
	if err != nil {
		return nil, s.fail(ctx, what, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("etcd: tenant id %d: %w", id, store.ErrNotFound)
	}
	raw := resp.Kvs[0].Value
	if len(raw) > maxNameLen || store.ValidateName(string(raw)) != nil {
		return nil, fmt.Errorf("etcd: tenant id %d: %w: the ID index holds no valid name", id, store.ErrInvalid)
	}
	name := string(raw)
	tresp, err := s.client.Get(ctx, s.tenantKey(name), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		return nil, s.fail(ctx, what, err)
	}
	if len(tresp.Kvs) == 0 {
		return nil, fmt.Errorf("etcd: tenant id %d: %w: the ID index names %q, which does not exist",
			id, store.ErrInvalid, name)
	}
	t, err := decode(name, tresp.Kvs[0])
	if err != nil {
		return nil, err
	}
	if t.ID != id {
		return nil, fmt.Errorf("etcd: tenant id %d: %w: the ID index names %q, whose id is %d",
			id, store.ErrInvalid, name, t.ID)
	}
	return t, nil
}

// ListTenants returns copies of up to limit tenants whose names sort after
// `after` (byte-wise, which for valid names is Go string order), in that
// order, read in one range request. It returns an empty slice when there are
// none. Start with after == "" and pass the last name of each page to get
// the next. It returns an error wrapping store.ErrInvalid if limit < 1 or a
// stored record is malformed, store.ErrClosed after Close, or a context or
// availability error (see the package doc). Each page is a consistent
// snapshot; pages are not a snapshot of each other. Safe for concurrent use.
func (s *Store) ListTenants(ctx context.Context, after string, limit int) ([]*store.Tenant, error) {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer end()
	if limit < 1 {
		return nil, fmt.Errorf("etcd: list tenants: %w: limit %d is not positive", store.ErrInvalid, limit)
	}
	prefix := s.TenantsPrefix()
	resp, err := s.client.Get(ctx, prefix+after+"\x00",
		clientv3.WithRange(clientv3.GetPrefixRangeEnd(prefix)),
		clientv3.WithLimit(int64(limit)),
		clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, s.fail(ctx, "list tenants", err)
	}
	out := make([]*store.Tenant, 0, min(len(resp.Kvs), limit, maxListPrealloc))
	for _, kv := range resp.Kvs {
		t, err := decode(string(kv.Key[len(prefix):]), kv)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

// UpdateTenant replaces the record named t.Name with t if the stored
// revision is still t.Revision, and sets t.Revision to the new revision. It
// returns an error wrapping store.ErrInvalid if t is nil or invalid or its ID
// differs from the stored one, store.ErrNotFound if there is no such tenant,
// store.ErrConflict if the revision is stale (re-read and retry),
// store.ErrClosed after Close, or a context or availability error (see the
// package doc). Nothing is written on error, unless the error is a context or
// availability error from a write that was sent. Safe for concurrent use: of
// several updates from the same revision, by any clients of the cluster,
// exactly one succeeds.
func (s *Store) UpdateTenant(ctx context.Context, t *store.Tenant) error {
	return s.UpdateTenants(ctx, []*store.Tenant{t})
}

// UpdateTenants implements store.Store: UpdateTenant for many tenants in
// one etcd transaction, all or nothing. Besides the errors of UpdateTenant,
// it returns one wrapping store.ErrInvalid for more than MaxBatch tenants,
// and one wrapping store.ErrConflict if a tenant is in ts twice (the second
// write would be from a stale revision). On success every tenant's Revision
// is the same new revision.
func (s *Store) UpdateTenants(ctx context.Context, ts []*store.Tenant) error {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	if len(ts) > MaxBatch {
		return fmt.Errorf("etcd: update tenants: %w: %d tenants, over the limit of %d per transaction",
			store.ErrInvalid, len(ts), MaxBatch)
	}
	cmps := make([]clientv3.Cmp, 0, 2*len(ts))
	puts := make([]clientv3.Op, 0, len(ts))
	reads := make([]clientv3.Op, 0, 2*len(ts))
	seen := make(map[string]bool, len(ts))
	for _, t := range ts {
		if t == nil {
			return fmt.Errorf("etcd: update tenant: %w: nil tenant", store.ErrInvalid)
		}
		if err := t.Validate(); err != nil {
			return fmt.Errorf("etcd: update tenant: %w", err)
		}
		if seen[t.Name] {
			return fmt.Errorf("etcd: update tenant %q: %w: the tenant is in the batch twice", t.Name, store.ErrConflict)
		}
		seen[t.Name] = true
		val, err := encode(t)
		if err != nil {
			return fmt.Errorf("etcd: update tenant %q: %w", t.Name, err)
		}
		tkey, ikey := s.tenantKey(t.Name), s.idKey(t.ID)
		cmps = append(cmps,
			clientv3.Compare(clientv3.ModRevision(tkey), "=", modRevision(t.Revision)),
			clientv3.Compare(clientv3.Value(ikey), "=", t.Name))
		puts = append(puts, clientv3.OpPut(tkey, string(val)))
		reads = append(reads, clientv3.OpGet(tkey, clientv3.WithKeysOnly()), clientv3.OpGet(ikey))
	}
	if len(ts) == 0 {
		return nil
	}
	resp, err := s.client.Txn(ctx).If(cmps...).Then(puts...).Else(reads...).Commit()
	if err != nil {
		what := fmt.Sprintf("update tenant %q", ts[0].Name)
		if len(ts) > 1 {
			what = fmt.Sprintf("update %d tenants", len(ts))
		}
		return s.fail(ctx, what, err)
	}
	if !resp.Succeeded {
		return whyNotUpdated(ts, resp.Responses)
	}
	for _, t := range ts {
		t.Revision = uint64(resp.Header.Revision)
	}
	s.wrote(resp.Header.Revision)
	return nil
}

// whyNotUpdated returns the error of the first tenant of a failed
// UpdateTenants, from the reads of the transaction's else branch: for each
// tenant, its record (keys only) then its ID key.
func whyNotUpdated(ts []*store.Tenant, resps []*etcdserverpb.ResponseOp) error {
	for i, t := range ts {
		rec := resps[2*i].GetResponseRange().GetKvs()
		id := resps[2*i+1].GetResponseRange().GetKvs()
		switch {
		case len(rec) == 0:
			return fmt.Errorf("etcd: update tenant %q: %w", t.Name, store.ErrNotFound)
		case len(id) == 0 || string(id[0].Value) != t.Name:
			return fmt.Errorf("etcd: update tenant %q: %w: id cannot change", t.Name, store.ErrInvalid)
		case rec[0].ModRevision != modRevision(t.Revision):
			return fmt.Errorf("etcd: update tenant %q: %w: revision %d, stored %d",
				t.Name, store.ErrConflict, t.Revision, rec[0].ModRevision)
		}
	}
	return fmt.Errorf("etcd: update tenants: %w: the transaction failed but no tenant differs", store.ErrConflict)
}

// DeleteTenant removes the record and its ID index entry, if the stored
// revision is still revision. It reads the record (for its ID), then deletes
// in a transaction conditional on the record being unchanged. Errors:
// store.ErrNotFound, store.ErrConflict, store.ErrInvalid if the stored record
// is malformed, store.ErrClosed, or a context or availability error (see the
// package doc). Safe for concurrent use.
func (s *Store) DeleteTenant(ctx context.Context, name string, revision uint64) error {
	ctx, end, err := s.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	if len(name) > maxNameLen || store.ValidateName(name) != nil {
		return fmt.Errorf("etcd: delete tenant: %w (not a valid name)", store.ErrNotFound)
	}
	what := fmt.Sprintf("delete tenant %q", name)
	tkey := s.tenantKey(name)
	resp, err := s.client.Get(ctx, tkey)
	if err != nil {
		return s.fail(ctx, what, err)
	}
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("etcd: %s: %w", what, store.ErrNotFound)
	}
	if stored := resp.Kvs[0].ModRevision; stored != modRevision(revision) {
		return fmt.Errorf("etcd: %s: %w: revision %d, stored %d", what, store.ErrConflict, revision, stored)
	}
	t, err := decode(name, resp.Kvs[0])
	if err != nil {
		return err
	}
	ikey := s.idKey(t.ID)
	tresp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(tkey), "=", resp.Kvs[0].ModRevision),
			clientv3.Compare(clientv3.Value(ikey), "=", name)).
		Then(clientv3.OpDelete(tkey), clientv3.OpDelete(ikey)).
		Else(clientv3.OpGet(tkey, clientv3.WithKeysOnly())).
		Commit()
	if err != nil {
		return s.fail(ctx, what, err)
	}
	if tresp.Succeeded {
		s.wrote(tresp.Header.Revision)
		return nil
	}
	rec := tresp.Responses[0].GetResponseRange().GetKvs()
	switch {
	case len(rec) == 0:
		return fmt.Errorf("etcd: %s: %w", what, store.ErrNotFound)
	case rec[0].ModRevision != resp.Kvs[0].ModRevision:
		return fmt.Errorf("etcd: %s: %w: revision %d, stored %d", what, store.ErrConflict, revision, rec[0].ModRevision)
	}
	return fmt.Errorf("etcd: %s: %w: the ID index does not name the tenant", what, store.ErrInvalid)
}
