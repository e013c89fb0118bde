package server

import (
	"context"
	"errors"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/store"
)

// Item error reasons (hsmdv1.ItemError.reason).
const (
	ReasonMalformed     = "MALFORMED"
	ReasonDecryptFailed = "DECRYPT_FAILED"
	ReasonUnavailable   = "UNAVAILABLE"
	ReasonDeadline      = "DEADLINE_EXCEEDED"
	ReasonKeyDisabled   = "KEY_DISABLED"
	ReasonKeyDestroyed  = "KEY_DESTROYED"
	ReasonKeyRetired    = "KEY_VERSION_RETIRED"
	ReasonInternal      = "INTERNAL"
)

var (
	// errNotFound marks an unknown tenant named by a request.
	errNotFound = errors.New("not found")
	// errPrecondition marks a request the tenant's state does not allow.
	errPrecondition = errors.New("failed precondition")
)

// toStatus maps an error to a gRPC status, in this one place. Messages of
// known errors are written to be safe to return (names and sizes, never
// secrets or payloads); anything unknown becomes INTERNAL with a fixed
// message and the request ID, and is logged in full.
func toStatus(ctx context.Context, log *slog.Logger, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	// The caller's own deadline or cancellation, whatever it interrupted.
	switch ctx.Err() {
	case context.DeadlineExceeded:
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case context.Canceled:
		return status.Error(codes.Canceled, "canceled")
	}
	var le *limitError
	switch {
	case errors.As(err, &le):
		return status.Error(codes.InvalidArgument, le.Error())
	case errors.Is(err, errNotFound), errors.Is(err, store.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, store.ErrExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, store.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, envelope.ErrTooManyGroups):
		return status.Errorf(codes.InvalidArgument, "%v (envelope.max_key_groups): split the batch", err)
	case errors.Is(err, errPrecondition):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, store.ErrConflict):
		return status.Error(codes.Aborted, "concurrent update; retry")
	case errors.Is(err, envelope.ErrDerive):
		log.LogAttrs(ctx, slog.LevelWarn, "data key derivation failed", slog.String("request_id", requestID(ctx)), slog.Any("error", err))
		return status.Error(codes.Unavailable, "the HSM is unavailable; retry later")
	case isAuditUnavailable(err):
		log.LogAttrs(ctx, slog.LevelError, "audit log refused an entry", slog.String("request_id", requestID(ctx)), slog.Any("error", err))
		if isDiskFull(err) {
			return status.Error(codes.ResourceExhausted, "the audit log cannot record this change: "+msgDiskFull+" (it was made; check before retrying)")
		}
		return status.Error(codes.Unavailable, "the audit log cannot record this change (it was made; check before retrying)")
	case isDiskFull(err):
		log.LogAttrs(ctx, slog.LevelError, "disk full", slog.String("request_id", requestID(ctx)), slog.Any("error", err))
		return status.Error(codes.ResourceExhausted, msgDiskFull+"; free space, then retry")
	case errors.Is(err, store.ErrClosed):
		return status.Error(codes.Unavailable, "the server is shutting down")
	case errors.Is(err, store.ErrUnavailable):
		log.LogAttrs(ctx, slog.LevelWarn, "metadata store unavailable", slog.String("request_id", requestID(ctx)), slog.Any("error", err))
		return status.Error(codes.Unavailable, "the metadata store is unavailable; retry later")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	}
	id := requestID(ctx)
	log.LogAttrs(ctx, slog.LevelError, "internal error", slog.String("request_id", id), slog.Any("error", err))
	return status.Errorf(codes.Internal, "internal error (request id %s)", id)
}

// itemError maps the failure of one item of a batch. Callers map each
// distinct error once: it may log.
func itemError(ctx context.Context, log *slog.Logger, err error) *hsmdv1.ItemError {
	switch {
	case errors.Is(err, envelope.ErrMalformed):
		return &hsmdv1.ItemError{Code: int32(codes.InvalidArgument), Reason: ReasonMalformed, Message: err.Error()}
	case err == envelope.ErrDecrypt:
		return &hsmdv1.ItemError{Code: int32(codes.InvalidArgument), Reason: ReasonDecryptFailed, Message: envelope.ErrDecrypt.Error()}
	case errors.Is(err, rotation.ErrDisabled):
		return &hsmdv1.ItemError{Code: int32(codes.FailedPrecondition), Reason: ReasonKeyDisabled, Message: "the key version is disabled"}
	case errors.Is(err, rotation.ErrDestroyed):
		return &hsmdv1.ItemError{Code: int32(codes.FailedPrecondition), Reason: ReasonKeyDestroyed, Message: "the key version is destroyed"}
	case errors.Is(err, rotation.ErrBelowMinVersion):
		return &hsmdv1.ItemError{Code: int32(codes.FailedPrecondition), Reason: ReasonKeyRetired, Message: "the key version is below the tenant's min_decryption_version"}
	}
	st := status.Convert(toStatus(ctx, log, err))
	reason := ReasonInternal
	switch st.Code() {
	case codes.Unavailable:
		reason = ReasonUnavailable
	case codes.DeadlineExceeded, codes.Canceled:
		reason = ReasonDeadline
	}
	return &hsmdv1.ItemError{Code: int32(st.Code()), Reason: reason, Message: st.Message()}
}
