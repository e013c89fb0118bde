package client

import (
	"context"
	"fmt"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// Tenant is a tenant's metadata. It holds no key material.
type Tenant struct {
	Name string
	// ID is the identifier carried in every ciphertext of the tenant (hex).
	ID string
	// CurrentVersion is the key version new encryptions use.
	CurrentVersion uint32
	Versions       []KeyVersion
	CreateTime     time.Time
}

// KeyVersion is one version of a tenant key.
type KeyVersion struct {
	Version uint32
	// KDKVersion is the root key version this tenant version derives from.
	KDKVersion uint32
	// State is one of StateEnabled, StateDisabled, StateDestroyScheduled
	// and StateDestroyed; a later server may add states.
	State      string
	CreateTime time.Time
	// DestroyTime is when a scheduled destruction happens, or happened;
	// the zero time for a version never scheduled for destruction.
	DestroyTime time.Time
}

// listPageSize is the page size ListTenants asks for (the server's maximum).
const listPageSize = 1000

// CreateTenant creates a tenant with key version 1. A taken name is
// codes.AlreadyExists; an invalid one codes.InvalidArgument.
func (c *Client) CreateTenant(ctx context.Context, name string) (Tenant, error) {
	t, err := c.tenants.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: name})
	if err != nil {
		return Tenant{}, err
	}
	return tenantFromProto(t), nil
}

// GetTenant returns a tenant's metadata; codes.NotFound if it is unknown.
func (c *Client) GetTenant(ctx context.Context, name string) (Tenant, error) {
	t, err := c.tenants.GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: name})
	if err != nil {
		return Tenant{}, err
	}
	return tenantFromProto(t), nil
}

// ListTenants returns every tenant, in name order. It fetches all pages
// (one RPC per 1000 tenants) before returning, so the result is not a
// snapshot: tenants created or removed meanwhile may or may not appear.
// It fails if any page fails, or if the server repeats a page token.
func (c *Client) ListTenants(ctx context.Context) ([]Tenant, error) {
	var out []Tenant
	seen := map[string]bool{}
	token := ""
	for {
		resp, err := c.tenants.ListTenants(ctx, &hsmdv1.ListTenantsRequest{PageSize: listPageSize, PageToken: token})
		if err != nil {
			return nil, err
		}
		for _, t := range resp.GetTenants() {
			out = append(out, tenantFromProto(t))
		}
		token = resp.GetNextPageToken()
		if token == "" {
			return out, nil
		}
		if seen[token] {
			return nil, fmt.Errorf("hsmd client: list tenants: server repeated a page token")
		}
		seen[token] = true
	}
}

// ShredTenant destroys every key version of the tenant, at once and for
// good: nothing it encrypted can be decrypted again (what store backups
// still allow is in docs/KEYS.md). There is no undo: ShredTenant sends the
// name as the server's confirmation, so asking a human to confirm is the
// caller's job. An unknown tenant is codes.NotFound.
func (c *Client) ShredTenant(ctx context.Context, name string, opts ...CallOption) error {
	o := callOptions(opts)
	_, err := c.tenants.ShredTenant(ctx, &hsmdv1.ShredTenantRequest{Name: name, Confirm: name, Approval: o.approval})
	return err
}

// CallOption adds to one call.
type CallOption func(*callOpts)

type callOpts struct{ approval []byte }

func callOptions(opts []CallOption) callOpts {
	var o callOpts
	for _, f := range opts {
		f(&o)
	}
	return o
}

// WithApproval sends the quorum-approved request (a signed note from
// `hsmd approve`) that a server with a quorum policy requires of
// ShredTenant and ScheduleDestroy.
func WithApproval(note []byte) CallOption {
	return func(o *callOpts) { o.approval = note }
}

func tenantFromProto(t *hsmdv1.Tenant) Tenant {
	out := Tenant{
		Name:           t.GetName(),
		ID:             t.GetId(),
		CurrentVersion: t.GetCurrentVersion(),
		CreateTime:     unixTime(t.GetCreateTime()),
	}
	for _, v := range t.GetVersions() {
		out.Versions = append(out.Versions, keyVersionFromProto(v))
	}
	return out
}

func keyVersionFromProto(v *hsmdv1.KeyVersion) KeyVersion {
	return KeyVersion{
		Version:     v.GetVersion(),
		KDKVersion:  v.GetKdkVersion(),
		State:       v.GetState(),
		CreateTime:  unixTime(v.GetCreateTime()),
		DestroyTime: unixTime(v.GetDestroyTime()),
	}
}

// unixTime maps Unix seconds to a time, and 0 (unset) to the zero time.
func unixTime(s int64) time.Time {
	if s == 0 {
		return time.Time{}
	}
	return time.Unix(s, 0).UTC()
}
