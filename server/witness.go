package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"

	"github.com/transparency-dev/formats/log"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/signing"
)

// The google.rpc.ErrorInfo detail of Audit.SignCheckpoint refusals that a
// client acts on.
const (
	// ErrorDomain is the ErrorInfo domain of hsmd's errors.
	ErrorDomain = "hsmd"
	// ReasonSizeConflict (code ABORTED): old_size is not the witness's size
	// for the log; Metadata[MetadataSize] holds that size in decimal.
	ReasonSizeConflict = "SIZE_CONFLICT"
	// ReasonBadProof (code FAILED_PRECONDITION): the consistency proof does
	// not verify, or the checkpoint forks the log at the cosigned size.
	ReasonBadProof = "BAD_PROOF"
	// MetadataSize is the ErrorInfo metadata key of the witness's size.
	MetadataSize = "size"
)

// errSigner marks a failure of a witness signing key (an HSM error, a
// signature that fails its own check): UNAVAILABLE over gRPC, 503 over
// HTTP. The client may retry.
var errSigner = errors.New("server: witness signing key failed")

// contextualSigner is the optional ability of a note.Signer
// (signing.NoteSigner, signing.CosignatureSigner) to bind one signing call
// to a context.
type contextualSigner interface {
	WithContext(ctx context.Context) note.Signer
}

// taggedSigner is a note.Signer whose errors match errSigner, keeping the
// WithContext ability of the signer it wraps.
type taggedSigner struct{ s note.Signer }

func (t taggedSigner) Name() string    { return t.s.Name() }
func (t taggedSigner) KeyHash() uint32 { return t.s.KeyHash() }

func (t taggedSigner) Sign(msg []byte) ([]byte, error) {
	sig, err := t.s.Sign(msg)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errSigner, err)
	}
	return sig, nil
}

func (t taggedSigner) WithContext(ctx context.Context) note.Signer {
	if cs, ok := t.s.(contextualSigner); ok {
		return taggedSigner{cs.WithContext(ctx)}
	}
	return t
}

// prepareWitness checks w and returns a copy of it whose Signer's failures
// match errSigner. The copy shares w's Logs and State.
func prepareWitness(w *signing.Witness) (*signing.Witness, error) {
	switch {
	case w == nil:
		return nil, errors.New("server: witness: nil Witness")
	case w.Signer == nil:
		return nil, errors.New("server: witness: Witness.Signer is required")
	case w.State == nil:
		return nil, errors.New("server: witness: Witness.State is required")
	case len(w.Logs) == 0:
		return nil, errors.New("server: witness: Witness.Logs registers no log")
	}
	c := *w
	c.Signer = taggedSigner{w.Signer}
	return &c, nil
}

// WitnessConfig holds the optional parts of a WitnessService.
type WitnessConfig struct {
	// ECDSA, if set, makes the signature that a request's hsm_ecdsa asks
	// for: in hsmd, a signing.NoteSigner named by the witness name over the
	// HSM's ECDSA P-256 key.
	ECDSA note.Signer
	// MLDSA, if set, makes the cosignature that a request's mldsa asks for:
	// a signing.MLDSASigner named by the witness name.
	MLDSA note.Signer
	// Logger receives signing failures and internal errors, never request
	// contents; nil discards them.
	Logger *slog.Logger
}

// WitnessService is the Audit gRPC service: a C2SP tlog-witness over a
// signing.Witness, with optional extra signatures. It is safe for
// concurrent use.
type WitnessService struct {
	w     *signing.Witness
	ecdsa note.Signer
	mldsa note.Signer
	log   *slog.Logger
}

// NewWitnessService returns the Audit service of w, whose Signer makes the
// cosignature (in hsmd, a signing.CosignatureSigner over the HSM's Ed25519
// key), State records what was cosigned, and Logs registers at least one
// log. The service does not own w's State or signers' keys: the caller
// closes them after stopping the server.
func NewWitnessService(w *signing.Witness, cfg WitnessConfig) (*WitnessService, error) {
	pw, err := prepareWitness(w)
	if err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &WitnessService{w: pw, log: cfg.Logger}
	if cfg.ECDSA != nil {
		s.ecdsa = taggedSigner{cfg.ECDSA}
	}
	if cfg.MLDSA != nil {
		s.mldsa = taggedSigner{cfg.MLDSA}
	}
	return s, nil
}

// Register adds the Audit service to g.
func (s *WitnessService) Register(g *grpc.Server) {
	hsmdv1.RegisterAuditServer(g, &auditService{s: s})
}

type auditService struct {
	hsmdv1.UnimplementedAuditServer
	s *WitnessService
}

// SignCheckpoint cosigns a checkpoint consistent with the witness's record.
func (a *auditService) SignCheckpoint(ctx context.Context, req *hsmdv1.SignCheckpointRequest) (*hsmdv1.SignCheckpointResponse, error) {
	if requestID(ctx) == "" {
		// Not behind Server's interceptor: still name internal errors.
		ctx = context.WithValue(ctx, ctxKey{}, newRequestID())
	}
	sigs, err := a.s.signCheckpoint(ctx, req)
	if err != nil {
		return nil, witnessStatus(ctx, a.s.log, err)
	}
	return &hsmdv1.SignCheckpointResponse{Signatures: sigs}, nil
}

func (s *WitnessService) signCheckpoint(ctx context.Context, req *hsmdv1.SignCheckpointRequest) ([]byte, error) {
	var extra []note.Signer
	if req.GetHsmEcdsa() {
		if s.ecdsa == nil {
			return nil, status.Error(codes.FailedPrecondition, "hsm_ecdsa: this witness has no ECDSA signing key configured")
		}
		extra = append(extra, s.ecdsa)
	}
	if req.GetMldsa() {
		if s.mldsa == nil {
			return nil, status.Error(codes.FailedPrecondition, "mldsa: this witness has no ML-DSA-44 key configured")
		}
		if hasExtensionLines(req.GetCheckpoint()) {
			return nil, status.Error(codes.InvalidArgument, "mldsa: an ML-DSA-44 cosignature/v1 cannot cover checkpoint extension lines")
		}
		extra = append(extra, s.mldsa)
	}
	proof := req.GetConsistencyProof()
	if len(proof) > signing.MaxProofHashes {
		return nil, status.Errorf(codes.InvalidArgument, "consistency_proof: %d hashes exceed the limit of %d", len(proof), signing.MaxProofHashes)
	}
	for i, h := range proof {
		if len(h) != 32 {
			return nil, status.Errorf(codes.InvalidArgument, "consistency_proof[%d]: %d bytes, want a 32-byte SHA-256 hash", i, len(h))
		}
	}
	sigs, err := s.w.AddCheckpoint(ctx, req.GetOldSize(), proof, req.GetCheckpoint())
	if err != nil || len(extra) == 0 {
		return sigs, err
	}
	// Extra signatures only once the checkpoint is accepted and recorded.
	more, err := signText(ctx, noteText(req.GetCheckpoint()), extra)
	if err != nil {
		return nil, err
	}
	return append(sigs, more...), nil
}

// noteText returns the text of the signed note msg, as note.Open splits it:
// everything up to and including the newline before the last blank line.
func noteText(msg []byte) []byte {
	i := bytes.LastIndex(msg, []byte("\n\n"))
	if i < 0 {
		return nil
	}
	return msg[:i+1]
}

// hasExtensionLines reports whether the signed note msg is a checkpoint
// with lines after its root hash. Malformed notes are left to the witness.
func hasExtensionLines(msg []byte) bool {
	var c log.Checkpoint
	rest, err := c.Unmarshal(noteText(msg))
	return err == nil && len(rest) > 0
}

// signText returns the signature lines of signers over the note text.
func signText(ctx context.Context, text []byte, signers []note.Signer) ([]byte, error) {
	ss := make([]note.Signer, len(signers))
	for i, s := range signers {
		if cs, ok := s.(contextualSigner); ok {
			s = cs.WithContext(ctx)
		}
		ss[i] = s
	}
	signed, err := note.Sign(&note.Note{Text: string(text)}, ss...)
	if err != nil {
		return nil, fmt.Errorf("server: witness: extra signature: %w", err)
	}
	// note.Sign returns the text, a blank line, then the signature lines.
	sigs, ok := bytes.CutPrefix(signed, []byte(string(text)+"\n"))
	if !ok {
		return nil, errors.New("server: witness: extra signature: unexpected note layout")
	}
	return sigs, nil
}

// witnessStatus maps a SignCheckpoint error to a status: the witness's
// refusals here, anything else through toStatus (deadlines, INTERNAL with
// the request ID). Messages name the cause; checkpoints hold no secrets.
func witnessStatus(ctx context.Context, lg *slog.Logger, err error) error {
	var ce *signing.ConflictError
	switch {
	case errors.As(err, &ce):
		return withErrorInfo(codes.Aborted, fmt.Sprintf("old_size conflict: the witness's size for this log is %d; retry with old_size %d", ce.Size, ce.Size),
			ReasonSizeConflict, map[string]string{MetadataSize: strconv.FormatUint(ce.Size, 10)})
	case errors.Is(err, signing.ErrUnknownOrigin):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, signing.ErrBadLogSignature):
		return status.Error(codes.PermissionDenied, err.Error())
	case errors.Is(err, signing.ErrBadProof):
		return withErrorInfo(codes.FailedPrecondition, err.Error(), ReasonBadProof, nil)
	case errors.Is(err, signing.ErrMalformed):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, errSigner) && ctx.Err() == nil:
		id := requestID(ctx)
		lg.LogAttrs(ctx, slog.LevelWarn, "witness signing failed", slog.String("request_id", id), slog.Any("error", err))
		return status.Errorf(codes.Unavailable, "the witness signing key is unavailable; retry later (request id %s)", id)
	}
	return toStatus(ctx, lg, err)
}

// withErrorInfo returns a status with an ErrorInfo detail in ErrorDomain.
func withErrorInfo(c codes.Code, msg, reason string, md map[string]string) error {
	st := status.New(c, msg)
	if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: md}); err == nil {
		st = d
	}
	return st.Err()
}

// newRequestID returns a random request ID, as Server's interceptor makes.
func newRequestID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
