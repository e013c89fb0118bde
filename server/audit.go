package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
)

// Auditor records hsmd's calls and key events (an *audit.Log). Append
// fails with an error matching audit.ErrUnavailable when the log cannot
// take the entry; Err says whether it currently can.
type Auditor interface {
	Append(ctx context.Context, e audit.Entry, durable bool) error
	Err() error
}

// keyAdmin are the methods that change keys, tenants or a witness's state:
// each is recorded durably before it runs (refused if it cannot be) and its
// outcome durably before the reply.
var keyAdmin = map[string]bool{
	"RotateKey": true, "SetKeyPolicy": true, "DisableVersion": true, "EnableVersion": true,
	"ScheduleDestroy": true, "CancelDestroy": true,
	"CreateTenant": true, "ShredTenant": true,
	"SignCheckpoint": true,
}

// errAuditUnavailable is how a request fails when its audit entry cannot
// be recorded: UNAVAILABLE, or RESOURCE_EXHAUSTED naming the disk when the
// disk is full.
func errAuditUnavailable(ctx context.Context, log *slog.Logger, err error, after bool) error {
	log.LogAttrs(ctx, slog.LevelError, "audit log refused an entry; failing the request",
		slog.String("request_id", requestID(ctx)), slog.Any("error", err))
	code, why := codes.Unavailable, ""
	if isDiskFull(err) {
		code, why = codes.ResourceExhausted, ": "+msgDiskFull
	}
	if after {
		return status.Error(code, "the audit log cannot record the outcome of this call"+why+" (the change may have been made; check before retrying)")
	}
	return status.Error(code, "the audit log cannot record this call"+why+"; retry later")
}

// auditBefore records a key-management call before it runs. It returns a
// non-nil status error if the call must be refused.
func (s *Server) auditBefore(ctx context.Context, method, caller string, req any) error {
	a := s.cfg.Audit
	if a == nil {
		return nil
	}
	if !keyAdmin[method] {
		// Data plane: refuse at once while the log is failing.
		if err := a.Err(); err != nil {
			return errAuditUnavailable(ctx, s.log, err, false)
		}
		return nil
	}
	e := audit.Entry{Kind: audit.KindRequest, RequestID: requestID(ctx), Caller: caller, Method: method}
	s.describeRequest(&e, req)
	if err := a.Append(ctx, e, true); err != nil {
		return errAuditUnavailable(ctx, s.log, err, false)
	}
	return nil
}

// auditAfter records the outcome of a call: durably for key management,
// batched (or durably with audit.sync) for the data plane. A non-nil
// return replaces the call's reply.
func (s *Server) auditAfter(ctx context.Context, method, caller string, req, resp any, code codes.Code) error {
	a := s.cfg.Audit
	if a == nil {
		return nil
	}
	kind := audit.KindRPC
	if keyAdmin[method] {
		kind = audit.KindResponse
	}
	e := audit.Entry{Kind: kind, RequestID: requestID(ctx), Caller: caller, Method: method, Code: codeName(code)}
	s.describeRequest(&e, req)
	if code == codes.OK {
		describeResponse(&e, resp)
	}
	// The call ran: its record must not depend on the caller still waiting
	// (Append is bounded by the log's own timeout).
	if err := a.Append(context.WithoutCancel(ctx), e, kind == audit.KindResponse); err != nil {
		return errAuditUnavailable(ctx, s.log, err, kind == audit.KindResponse)
	}
	return nil
}

// codeName is the code's name as the gRPC status code constants spell it.
func codeName(c codes.Code) string {
	switch c {
	case codes.OK:
		return "OK"
	case codes.InvalidArgument:
		return "INVALID_ARGUMENT"
	case codes.NotFound:
		return "NOT_FOUND"
	case codes.AlreadyExists:
		return "ALREADY_EXISTS"
	case codes.PermissionDenied:
		return "PERMISSION_DENIED"
	case codes.FailedPrecondition:
		return "FAILED_PRECONDITION"
	case codes.Aborted:
		return "ABORTED"
	case codes.Unavailable:
		return "UNAVAILABLE"
	case codes.DeadlineExceeded:
		return "DEADLINE_EXCEEDED"
	case codes.Canceled:
		return "CANCELLED"
	case codes.ResourceExhausted:
		return "RESOURCE_EXHAUSTED"
	case codes.Unimplemented:
		return "UNIMPLEMENTED"
	case codes.Internal:
		return "INTERNAL"
	}
	return c.String()
}

// kmsCall is a KMS v2 plugin request with the tenant it maps to (the
// request itself names none), for describeRequest.
type kmsCall struct {
	tenant string
	req    any
}

// auditRequest is req as describeRequest takes it: a KMS v2 request
// wrapped with its tenant, any other as it is.
func auditRequest(info *grpc.UnaryServerInfo, req any) any {
	if k, ok := info.Server.(*kmsService); ok {
		return kmsCall{tenant: k.tenant, req: req}
	}
	return req
}

// describeRequest fills what the entry says about the request: tenant,
// version, item count and the HMACs of the distinct contexts. Never
// plaintext or ciphertext.
func (s *Server) describeRequest(e *audit.Entry, req any) {
	switch r := req.(type) {
	case *hsmdv1.EncryptRequest:
		e.Tenant, e.Items = r.Tenant, len(r.Items)
		s.contexts(e, len(r.Items), func(i int) map[string]string { return r.Items[i].Context })
	case *hsmdv1.DecryptRequest:
		e.Tenant, e.Items = r.Tenant, len(r.Items)
		s.contexts(e, len(r.Items), func(i int) map[string]string { return r.Items[i].Context })
	case *hsmdv1.RewrapRequest:
		e.Tenant, e.Items = r.Tenant, len(r.Items)
		s.contexts(e, len(r.Items), func(i int) map[string]string { return r.Items[i].Context })
	case *hsmdv1.RotateKeyRequest:
		e.Tenant = r.Tenant
	case *hsmdv1.GetKeyRequest:
		e.Tenant = r.Tenant
	case *hsmdv1.SetKeyPolicyRequest:
		e.Tenant = r.Tenant
		if p := r.Policy; p != nil {
			e.Detail = fmt.Sprintf("rotation_period_seconds=%d min_decryption_version=%d max_deks_per_version=%d",
				p.RotationPeriodSeconds, p.MinDecryptionVersion, p.MaxDeksPerVersion)
		}
	case *hsmdv1.VersionRequest:
		e.Tenant, e.KeyVersions = r.Tenant, []uint32{r.Version}
	case *hsmdv1.ScheduleDestroyRequest:
		e.Tenant, e.KeyVersions = r.Tenant, []uint32{r.Version}
		e.Detail = fmt.Sprintf("wait_seconds=%d", r.WaitSeconds)
	case *hsmdv1.CreateTenantRequest:
		e.Tenant = r.Name
	case *hsmdv1.GetTenantRequest:
		e.Tenant = r.Name
	case *hsmdv1.ShredTenantRequest:
		e.Tenant = r.Name
	case *hsmdv1.SignCheckpointRequest:
		e.Detail = checkpointSummary(r.Checkpoint, r.OldSize)
	case kmsCall:
		e.Tenant = r.tenant
		if _, ok := r.req.(*kmsapi.StatusRequest); !ok {
			e.Items = 1
		}
	}
	e.Tenant = clip(e.Tenant, 256)
}

// describeResponse adds what the reply says: the key version used, how
// many items failed alone, the versions a key call left.
func describeResponse(e *audit.Entry, resp any) {
	switch r := resp.(type) {
	case *hsmdv1.EncryptResponse:
		e.KeyVersions = []uint32{r.KeyVersion}
	case *hsmdv1.RewrapResponse:
		e.KeyVersions = []uint32{r.KeyVersion}
		for _, x := range r.Results {
			if x.Error != nil {
				e.FailedItems++
			}
		}
	case *hsmdv1.DecryptResponse:
		for _, x := range r.Results {
			if x.Error != nil {
				e.FailedItems++
			}
		}
	case *hsmdv1.Key:
		if e.KeyVersions == nil {
			e.KeyVersions = []uint32{r.CurrentVersion}
		}
	}
}

// contexts records the HMACs of the distinct contexts of n items (at most
// audit.MaxContexts), comparing maps before hashing any.
func (s *Server) contexts(e *audit.Entry, n int, ctxAt func(int) map[string]string) {
	h := s.cfg.AuditContexts
	if h == nil {
		return
	}
	var distinct []map[string]string
	for i := range n {
		c := ctxAt(i)
		if len(c) == 0 {
			continue
		}
		if k := len(distinct); k > 0 && maps.Equal(distinct[k-1], c) {
			continue
		}
		if slices.ContainsFunc(distinct, func(d map[string]string) bool { return maps.Equal(d, c) }) {
			continue
		}
		if len(distinct) == audit.MaxContexts {
			e.ContextsTruncated = true
			break
		}
		distinct = append(distinct, c)
	}
	for _, c := range distinct {
		e.Contexts = append(e.Contexts, h.Sum(canonicalContext(c)))
	}
}

// canonicalContext encodes a context map unambiguously: its pairs in key
// order, each string length-prefixed.
func canonicalContext(m map[string]string) []byte {
	var b []byte
	for _, k := range slices.Sorted(maps.Keys(m)) {
		b = binary.BigEndian.AppendUint32(b, uint32(len(k)))
		b = append(b, k...)
		b = binary.BigEndian.AppendUint32(b, uint32(len(m[k])))
		b = append(b, m[k]...)
	}
	return b
}

// checkpointSummary names the origin and size of a checkpoint a witness
// is asked to sign (public data), bounded.
func checkpointSummary(cp []byte, oldSize uint64) string {
	lines := bytes.SplitN(cp[:min(len(cp), 512)], []byte("\n"), 3)
	if len(lines) < 3 {
		return fmt.Sprintf("old_size=%d malformed checkpoint", oldSize)
	}
	return fmt.Sprintf("origin=%q size=%s old_size=%d", clip(string(lines[0]), 256), clip(string(lines[1]), 24), oldSize)
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// KeyEvent records a committed key change durably (the daemon calls it
// from the rotation Manager's OnChange and the Scheduler's OnBatch, before
// the rollback counter advances).
func KeyEvent(ctx context.Context, a Auditor, op, tenant string, versions []uint32) error {
	if a == nil {
		return nil
	}
	e := audit.Entry{Kind: audit.KindKeyEvent, RequestID: requestID(ctx), Op: op, Tenant: clip(tenant, 256), KeyVersions: versions}
	// The change is committed: record it even if the caller gave up.
	if err := a.Append(context.WithoutCancel(ctx), e, true); err != nil {
		return fmt.Errorf("audit key event %s on tenant %q: %w", op, tenant, err)
	}
	return nil
}

// isAuditUnavailable reports whether err is an audit refusal.
func isAuditUnavailable(err error) bool { return errors.Is(err, audit.ErrUnavailable) }
