package server

import (
	"context"
	"errors"
	"strconv"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hsmd/hsmd/quorum"
)

// authorize checks and spends the quorum approval of a destructive call
// when the server has a quorum policy (Config.Quorum); without one it
// allows the call. Refusals are PERMISSION_DENIED (FAILED_PRECONDITION
// for an approval that expired or was already used), saying why.
func (s *Server) authorize(ctx context.Context, approval []byte, op quorum.Operation) error {
	p := s.cfg.Quorum
	if p == nil {
		return nil
	}
	if len(approval) == 0 {
		return status.Errorf(codes.PermissionDenied, "%s needs a quorum-approved request (%d approvals): create one with `hsmd approve new --kind %s`", op.Kind, p.Threshold, op.Kind)
	}
	if len(approval) > maxApprovalSize {
		return status.Errorf(codes.InvalidArgument, "approval over %d bytes", maxApprovalSize)
	}
	a, err := p.Authorize(ctx, s.cfg.QuorumSpent, approval, op, s.cfg.Now())
	var few *quorum.TooFewApprovalsError
	switch {
	case err == nil:
		s.log.InfoContext(ctx, "quorum approval accepted", "request_id", requestID(ctx), "operation", op.Kind, "approvers", a.Approvers)
		return nil
	case errors.As(err, &few):
		return status.Errorf(codes.PermissionDenied, "%d valid approvals of %d needed", few.Valid, few.Needed)
	case errors.Is(err, quorum.ErrWrongOperation):
		return status.Error(codes.PermissionDenied, "the approval is for another operation")
	case errors.Is(err, quorum.ErrExpired), errors.Is(err, quorum.ErrValidityTooLong):
		return status.Error(codes.FailedPrecondition, "the approval has expired or is valid for too long")
	case errors.Is(err, quorum.ErrReplayed):
		return status.Error(codes.FailedPrecondition, "the approval was already used")
	case errors.Is(err, quorum.ErrMalformedRequest), errors.Is(err, quorum.ErrMalformedNote), errors.Is(err, quorum.ErrInvalidSignature):
		return status.Errorf(codes.PermissionDenied, "the approval does not verify: %v", err)
	}
	return err
}

// maxApprovalSize bounds an approval note (a request and a few
// signatures; ML-DSA-44 signatures are ~3.3 KiB in base64).
const maxApprovalSize = 64 << 10

func shredOperation(tenant string) quorum.Operation {
	return quorum.Operation{Kind: quorum.KindShredTenant, Params: map[string]string{"tenant": tenant}}
}

// destroyOperation covers the waiting period too: approvers approve
// destroying that version after that wait (0: the default).
func destroyOperation(tenant string, v uint32, waitSeconds int64) quorum.Operation {
	return quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{
		"tenant": tenant, "version": strconv.FormatUint(uint64(v), 10), "wait_seconds": strconv.FormatInt(waitSeconds, 10),
	}}
}
