package server

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/store"
)

// DefaultRotationPeriod is a new tenant's rotation period.
const DefaultRotationPeriod = 90 * 24 * time.Hour

// Page sizes of ListTenants.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

type tenantsService struct {
	hsmdv1.UnimplementedTenantsServer
	s *Server
}

// CreateTenant creates a tenant with key version 1, a random ID and salt.
func (ts *tenantsService) CreateTenant(ctx context.Context, req *hsmdv1.CreateTenantRequest) (*hsmdv1.Tenant, error) {
	s := ts.s
	if err := store.ValidateName(req.Name); err != nil {
		return nil, err
	}
	now := s.cfg.Now().UTC()
	for range 3 { // a random 64-bit ID collides with another only by accident
		salt := make([]byte, store.SaltSize)
		t := &store.Tenant{
			Name: req.Name, Current: 1, CreateTime: now, Policy: store.Policy{RotationPeriod: DefaultRotationPeriod},
			Versions: []store.KeyVersion{{Version: 1, KDKVersion: s.cfg.KDKVersion, State: store.StateEnabled, Salt: salt, CreateTime: now}},
		}
		var id [8]byte
		if _, err := io.ReadFull(s.cfg.Rand, id[:]); err != nil {
			return nil, fmt.Errorf("server: draw tenant id: %w", err)
		}
		if _, err := io.ReadFull(s.cfg.Rand, salt); err != nil {
			return nil, fmt.Errorf("server: draw a key version salt: %w", err)
		}
		t.ID = binary.BigEndian.Uint64(id[:])
		if t.ID == 0 {
			continue
		}
		err := s.cfg.Store.CreateTenant(ctx, t)
		if err == nil {
			return tenantProto(t), nil
		}
		if !errors.Is(err, store.ErrExists) {
			return nil, err
		}
		if _, gerr := s.cfg.Store.GetTenant(ctx, req.Name); gerr == nil {
			return nil, fmt.Errorf("%w: tenant %q", store.ErrExists, req.Name)
		}
	}
	return nil, errors.New("server: could not draw a unique tenant id")
}

// GetTenant returns a tenant's metadata.
func (ts *tenantsService) GetTenant(ctx context.Context, req *hsmdv1.GetTenantRequest) (*hsmdv1.Tenant, error) {
	t, err := ts.s.tenant(ctx, req.Name)
	if err != nil {
		return nil, err
	}
	return tenantProto(t), nil
}

// ListTenants returns a page of tenants in name order. The page token is
// the last name of the previous page, encoded.
func (ts *tenantsService) ListTenants(ctx context.Context, req *hsmdv1.ListTenantsRequest) (*hsmdv1.ListTenantsResponse, error) {
	size := int(req.PageSize)
	switch {
	case size < 0 || size > MaxPageSize:
		return nil, &limitError{what: "page_size", limit: "max_page_size", got: size, max: MaxPageSize}
	case size == 0:
		size = DefaultPageSize
	}
	after, err := base64.RawURLEncoding.DecodeString(req.PageToken)
	if err != nil {
		return nil, fmt.Errorf("%w: bad page_token", store.ErrInvalid)
	}
	ts1, err := ts.s.cfg.Store.ListTenants(ctx, string(after), size+1)
	if err != nil {
		return nil, err
	}
	resp := &hsmdv1.ListTenantsResponse{}
	for i, t := range ts1 {
		if i == size {
			resp.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte(ts1[size-1].Name))
			break
		}
		resp.Tenants = append(resp.Tenants, tenantProto(t))
	}
	return resp, nil
}

func tenantProto(t *store.Tenant) *hsmdv1.Tenant {
	p := &hsmdv1.Tenant{
		Name: t.Name, Id: strconv.FormatUint(t.ID, 16), CurrentVersion: t.Current, CreateTime: t.CreateTime.Unix(),
	}
	for _, v := range t.Versions {
		kv := &hsmdv1.KeyVersion{
			Version: v.Version, KdkVersion: v.KDKVersion, State: string(v.State), CreateTime: v.CreateTime.Unix(),
			Deks: v.DEKs,
		}
		if !v.DestroyTime.IsZero() {
			kv.DestroyTime = v.DestroyTime.Unix()
		}
		p.Versions = append(p.Versions, kv)
	}
	return p
}
