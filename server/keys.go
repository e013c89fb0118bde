package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/store"
)

type keysService struct {
	hsmdv1.UnimplementedKeysServer
	s *Server
}

func (k *keysService) manager() (*rotation.Manager, error) {
	if k.s.cfg.Keys == nil {
		return nil, status.Error(codes.Unimplemented, "key management is not configured")
	}
	return k.s.cfg.Keys, nil
}

// RotateKey makes a new current version.
func (k *keysService) RotateKey(ctx context.Context, req *hsmdv1.RotateKeyRequest) (*hsmdv1.Key, error) {
	return k.apply(ctx, req.Tenant, func(m *rotation.Manager) (*store.Tenant, error) { return m.Rotate(ctx, req.Tenant) })
}

// GetKey returns the tenant's versions, states and policy.
func (k *keysService) GetKey(ctx context.Context, req *hsmdv1.GetKeyRequest) (*hsmdv1.Key, error) {
	t, err := k.s.tenant(ctx, req.Tenant)
	if err != nil {
		return nil, err
	}
	return keyProto(t), nil
}

// SetKeyPolicy replaces the tenant's key policy.
func (k *keysService) SetKeyPolicy(ctx context.Context, req *hsmdv1.SetKeyPolicyRequest) (*hsmdv1.Key, error) {
	p := store.Policy{
		RotationPeriod:       time.Duration(req.GetPolicy().GetRotationPeriodSeconds()) * time.Second,
		MinDecryptionVersion: req.GetPolicy().GetMinDecryptionVersion(),
		MaxDEKsPerVersion:    req.GetPolicy().GetMaxDeksPerVersion(),
	}
	return k.apply(ctx, req.Tenant, func(m *rotation.Manager) (*store.Tenant, error) { return m.SetPolicy(ctx, req.Tenant, p) })
}

// DisableVersion makes a version refuse to decrypt.
func (k *keysService) DisableVersion(ctx context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return k.apply(ctx, req.Tenant, func(m *rotation.Manager) (*store.Tenant, error) { return m.Disable(ctx, req.Tenant, req.Version) })
}

// EnableVersion undoes DisableVersion.
func (k *keysService) EnableVersion(ctx context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return k.apply(ctx, req.Tenant, func(m *rotation.Manager) (*store.Tenant, error) { return m.Enable(ctx, req.Tenant, req.Version) })
}

// ScheduleDestroy destroys a version after a waiting period.
func (k *keysService) ScheduleDestroy(ctx context.Context, req *hsmdv1.ScheduleDestroyRequest) (*hsmdv1.Key, error) {
	if req.WaitSeconds < 0 {
		return nil, status.Error(codes.InvalidArgument, "wait_seconds must not be negative")
	}
	wait := time.Duration(req.WaitSeconds) * time.Second
	if _, err := k.s.tenant(ctx, req.Tenant); err != nil {
		return nil, err
	}
	if k.s.cfg.Quorum != nil {
		// Refuse what would fail anyway before the approval is spent.
		m, err := k.manager()
		if err != nil {
			return nil, err
		}
		if err := m.CheckScheduleDestroy(ctx, req.Tenant, req.Version, wait); err != nil {
			return nil, rotationStatus(err)
		}
		if err := k.s.authorize(ctx, req.Approval, destroyOperation(req.Tenant, req.Version, req.WaitSeconds)); err != nil {
			return nil, err
		}
	}
	return k.apply(ctx, req.Tenant, func(m *rotation.Manager) (*store.Tenant, error) {
		return m.ScheduleDestroy(ctx, req.Tenant, req.Version, wait)
	})
}

// CancelDestroy returns a version scheduled for destruction to disabled.
func (k *keysService) CancelDestroy(ctx context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return k.apply(ctx, req.Tenant, func(m *rotation.Manager) (*store.Tenant, error) { return m.CancelDestroy(ctx, req.Tenant, req.Version) })
}

// apply checks the tenant exists, runs op, and maps rotation's errors.
func (k *keysService) apply(ctx context.Context, tenant string, op func(*rotation.Manager) (*store.Tenant, error)) (*hsmdv1.Key, error) {
	m, err := k.manager()
	if err != nil {
		return nil, err
	}
	if _, err := k.s.tenant(ctx, tenant); err != nil {
		return nil, err
	}
	t, err := op(m)
	if err != nil {
		return nil, rotationStatus(err)
	}
	return keyProto(t), nil
}

// rotationStatus maps the refusals of a key operation; other errors go to
// toStatus.
func rotationStatus(err error) error {
	switch {
	case errors.Is(err, rotation.ErrNoVersion):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, rotation.ErrTransition), errors.Is(err, rotation.ErrCurrent):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, rotation.ErrWaitTooShort), errors.Is(err, rotation.ErrPolicy):
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return err
}

func keyProto(t *store.Tenant) *hsmdv1.Key {
	k := &hsmdv1.Key{
		Tenant: t.Name, CurrentVersion: t.Current, Versions: tenantProto(t).Versions,
		Policy: &hsmdv1.KeyPolicy{
			RotationPeriodSeconds: int64(t.Policy.RotationPeriod / time.Second),
			MinDecryptionVersion:  t.Policy.MinDecryptionVersion,
			MaxDeksPerVersion:     t.Policy.MaxDEKsPerVersion,
		},
	}
	if next, ok := rotation.NextRotation(t); ok {
		k.NextRotationTime = next.Unix()
	}
	return k
}

// RecordDEK counts a data key derived to seal under ref, rotating the
// tenant early when its policy's max_deks_per_version is reached. It only
// queues the count: one background flusher at a time sums the queue per
// tenant version and writes it. Wire it to envelope.Config.OnSealKey.
func (s *Server) RecordDEK(ref envelope.KeyRef) {
	if s.cfg.Keys == nil {
		return
	}
	d := &s.deks
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.pending == nil {
		d.pending = map[dekKey]uint64{}
	}
	d.pending[dekKey{ref.Tenant, ref.Version}]++
	if !d.running {
		d.running = true
		go s.flushDEKs()
	}
}

type dekKey struct {
	tenant  string
	version uint32
}

// dekCounts is the queue of RecordDEK.
type dekCounts struct {
	mu      sync.Mutex
	pending map[dekKey]uint64
	running bool
}

func (s *Server) flushDEKs() {
	d := &s.deks
	for {
		d.mu.Lock()
		batch := d.pending
		d.pending = nil
		if len(batch) == 0 {
			d.running = false
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		for k, n := range batch {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if _, err := s.cfg.Keys.RecordDEK(ctx, k.tenant, k.version, n); err != nil {
				s.log.Warn("counting data keys for the usage limit", "tenant", k.tenant, "error", err)
			}
			cancel()
		}
	}
}

// ShredTenant destroys a tenant's key material.
func (ts *tenantsService) ShredTenant(ctx context.Context, req *hsmdv1.ShredTenantRequest) (*hsmdv1.ShredTenantResponse, error) {
	if req.Confirm != req.Name {
		return nil, status.Error(codes.InvalidArgument, "confirm must repeat the tenant name: shredding cannot be undone")
	}
	m, err := (&keysService{s: ts.s}).manager()
	if err != nil {
		return nil, err
	}
	if _, err := ts.s.tenant(ctx, req.Name); err != nil {
		return nil, err
	}
	if err := ts.s.authorize(ctx, req.Approval, shredOperation(req.Name)); err != nil {
		return nil, err
	}
	if err := m.Shred(ctx, req.Name); err != nil {
		return nil, fmt.Errorf("server: shred %q: %w", req.Name, err)
	}
	return &hsmdv1.ShredTenantResponse{}, nil
}
