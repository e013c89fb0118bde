package server

import (
	"context"
	"fmt"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
)

// Rewrap opens each item and seals it again under the tenant's current
// version with the same context, in one batch: the plaintexts stay in the
// server and are cleared when the call ends. An item already under the
// current version is returned as it is (in binary form).
func (e *envelopeService) Rewrap(ctx context.Context, req *hsmdv1.RewrapRequest) (*hsmdv1.RewrapResponse, error) {
	s := e.s
	if err := s.cfg.Limits.checkDecrypt(&hsmdv1.DecryptRequest{Tenant: req.Tenant, Items: req.Items}); err != nil {
		return nil, err
	}
	t, err := s.tenant(ctx, req.Tenant)
	if err != nil {
		return nil, err
	}
	cur, ok := keyRef(t, t.Current)
	if !ok {
		return nil, fmt.Errorf("%w: tenant %q has no enabled current key version", errPrecondition, t.Name)
	}
	items := ciphertexts(req.Items)
	opened, err := s.cfg.Engine.Open(ctx, s.resolver(req.Tenant), items)
	if err != nil {
		return nil, err
	}
	defer func() {
		for i := range opened {
			clear(opened[i].Plaintext)
		}
	}()
	out := &hsmdv1.RewrapResponse{Results: make([]*hsmdv1.RewrapResult, len(opened)), KeyVersion: cur.Version}
	var reseal []envelope.Item
	var at []int // result index of each resealed item
	errs := s.itemErrors(ctx)
	failed := 0
	for i := range opened {
		r := &hsmdv1.RewrapResult{}
		out.Results[i] = r
		if err := opened[i].Err; err != nil {
			failed++
			r.Error = errs.get(err)
			continue
		}
		if bin, ok := underVersion(items[i].Data, cur.Version); ok {
			r.Ciphertext = bin
			continue
		}
		reseal = append(reseal, envelope.Item{Plaintext: opened[i].Plaintext, Context: items[i].Context})
		at = append(at, i)
	}
	if len(reseal) > 0 {
		cts, err := s.cfg.Engine.Seal(ctx, cur, reseal)
		if err != nil {
			return nil, err
		}
		for j, i := range at {
			out.Results[i].Ciphertext = cts[j]
		}
	}
	s.cfg.Metrics.items.WithLabelValues("Rewrap", "resealed").Add(float64(len(reseal)))
	s.cfg.Metrics.items.WithLabelValues("Rewrap", "current").Add(float64(len(opened) - len(reseal) - failed))
	return out, nil
}

// underVersion returns the binary form of a ciphertext (binary or text)
// if it is under key version v.
func underVersion(data []byte, v uint32) ([]byte, bool) {
	if wire.IsText(data) {
		var err error
		if data, err = wire.DecodeText(data); err != nil {
			return nil, false
		}
	}
	h, _, err := wire.Parse(data)
	return data, err == nil && h.KeyVersion == v
}
