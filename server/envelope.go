package server

import (
	"context"
	"errors"
	"fmt"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/internal/grpccodec"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/store"
)

type envelopeService struct {
	hsmdv1.UnimplementedEnvelopeServer
	s *Server
}

// Encrypt seals a batch under the tenant's current key version.
func (e *envelopeService) Encrypt(ctx context.Context, req *hsmdv1.EncryptRequest) (*hsmdv1.EncryptResponse, error) {
	s := e.s
	if err := s.cfg.Limits.checkEncrypt(req); err != nil {
		return nil, err
	}
	t, err := s.tenant(ctx, req.Tenant)
	if err != nil {
		return nil, err
	}
	ref, ok := keyRef(t, t.Current)
	if !ok {
		return nil, fmt.Errorf("%w: tenant %q has no enabled current key version", errPrecondition, t.Name)
	}
	items := make([]envelope.Item, len(req.Items))
	in := 0
	for i, it := range req.Items {
		items[i] = envelope.Item{Plaintext: it.Plaintext, Context: it.Context}
		in += len(it.Plaintext)
	}
	// The ciphertexts are sealed straight into the response's wire form.
	resp := grpccodec.NewEncryptResponse(len(items), func(i int) int { return envelope.SealedSize(items[i : i+1]) }, ref.Version)
	if err := s.cfg.Engine.SealInto(ctx, ref, items, resp.Ciphertexts); err != nil {
		grpccodec.Release(resp)
		return nil, err
	}
	m := s.cfg.Metrics
	m.items.WithLabelValues("Encrypt", "ok").Add(float64(len(items)))
	m.bytes.WithLabelValues("Encrypt", "in").Add(float64(in))
	return resp, nil
}

// Decrypt opens a batch, item by item.
func (e *envelopeService) Decrypt(ctx context.Context, req *hsmdv1.DecryptRequest) (*hsmdv1.DecryptResponse, error) {
	s := e.s
	if err := s.cfg.Limits.checkDecrypt(req); err != nil {
		return nil, err
	}
	if req.Tenant != "" {
		if _, err := s.tenant(ctx, req.Tenant); err != nil {
			return nil, err
		}
	}
	// The request is this call's own copy: decrypt over it.
	opened, err := s.cfg.Engine.OpenInPlace(ctx, s.resolver(req.Tenant), ciphertexts(req.Items))
	if err != nil {
		return nil, err
	}
	results := make([]hsmdv1.DecryptResult, len(opened))
	out := &hsmdv1.DecryptResponse{Results: make([]*hsmdv1.DecryptResult, len(opened))}
	m := s.cfg.Metrics
	okN, outBytes := 0, 0
	errs := s.itemErrors(ctx)
	for i := range opened {
		r := &results[i]
		if err := opened[i].Err; err != nil {
			r.Error = errs.get(err)
			m.items.WithLabelValues("Decrypt", r.Error.Reason).Inc()
		} else {
			r.Plaintext = opened[i].Plaintext
			okN++
			outBytes += len(r.Plaintext)
		}
		out.Results[i] = r
	}
	m.items.WithLabelValues("Decrypt", "ok").Add(float64(okN))
	m.bytes.WithLabelValues("Decrypt", "out").Add(float64(outBytes))
	return out, nil
}

func ciphertexts(in []*hsmdv1.DecryptItem) []envelope.Ciphertext {
	items := make([]envelope.Ciphertext, len(in))
	for i, it := range in {
		items[i] = envelope.Ciphertext{Data: it.Ciphertext, Context: it.Context}
	}
	return items
}

// itemErrorMap maps each distinct item error once: the items of one group
// share their error, which is then logged once, not per item.
type itemErrorMap struct {
	ctx context.Context
	s   *Server
	m   map[error]*hsmdv1.ItemError
}

func (s *Server) itemErrors(ctx context.Context) *itemErrorMap {
	return &itemErrorMap{ctx: ctx, s: s, m: map[error]*hsmdv1.ItemError{}}
}

func (e *itemErrorMap) get(err error) *hsmdv1.ItemError {
	ie, ok := e.m[err]
	if !ok {
		ie = itemError(e.ctx, e.s.log, err)
		e.m[err] = ie
	}
	return ie
}

// tenant reads a tenant named by a request.
func (s *Server) tenant(ctx context.Context, name string) (*store.Tenant, error) {
	if name == "" {
		return nil, &limitError{what: "the tenant name's length", limit: "min_tenant_name", got: 0, max: 1}
	}
	t, err := s.cfg.Store.GetTenant(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("%w: tenant %q", errNotFound, name)
	}
	return t, err
}

// resolver maps a ciphertext's tenant id and key version to its key. If the
// request names a tenant, ciphertexts of any other tenant are unknown keys.
func (s *Server) resolver(only string) envelope.Resolver {
	return func(ctx context.Context, id uint64, v uint32) (envelope.KeyRef, error) {
		t, err := s.cfg.Store.GetTenantByID(ctx, id)
		if errors.Is(err, store.ErrNotFound) || (err == nil && only != "" && t.Name != only) {
			return envelope.KeyRef{}, envelope.ErrUnknownKey
		}
		if err != nil {
			return envelope.KeyRef{}, err
		}
		if _, ok := t.Version(v); !ok {
			return envelope.KeyRef{}, envelope.ErrUnknownKey
		}
		if err := rotation.CanDecrypt(t, v); err != nil {
			return envelope.KeyRef{}, err // disabled, destroyed, retired: said plainly to the tenant's callers
		}
		ref, ok := keyRef(t, v)
		if !ok {
			return envelope.KeyRef{}, envelope.ErrUnknownKey
		}
		return ref, nil
	}
}

// keyRef is the envelope's view of tenant version v.
func keyRef(t *store.Tenant, v uint32) (envelope.KeyRef, bool) {
	kv, ok := t.Version(v)
	if !ok || kv.State != store.StateEnabled || len(kv.Salt) != store.SaltSize {
		return envelope.KeyRef{}, false
	}
	ref := envelope.KeyRef{Tenant: t.Name, TenantID: t.ID, Version: v, KDKVersion: kv.KDKVersion}
	copy(ref.Salt[:], kv.Salt)
	return ref, true
}
