package server

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/transparency-dev/formats/log"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/signing"
)

// Constants of the C2SP tlog-witness HTTP interface.
const (
	// AddCheckpointPath is the add-checkpoint endpoint, below the
	// witness's submission prefix.
	AddCheckpointPath = "/add-checkpoint"
	// SizeContentType is the Content-Type of a "409 Conflict" answer whose
	// body is the witness's size for the log, in decimal, and a newline.
	SizeContentType = "text/x.tlog.size"
	// MaxAddCheckpointBody bounds an add-checkpoint request body: the old
	// size line, signing.MaxProofHashes base64 hash lines, the empty line
	// and a checkpoint of signing.MaxCheckpointSize bytes.
	MaxAddCheckpointBody = len("old 18446744073709551615\n") + signing.MaxProofHashes*(44+1) + 1 + signing.MaxCheckpointSize
)

// WitnessHandler is an http.Handler serving the C2SP tlog-witness
// add-checkpoint call (https://c2sp.org/tlog-witness) at
// AddCheckpointPath; mount it under a submission prefix with
// http.StripPrefix. It answers:
//
//   - 200 with the cosignature line(s), each ending in a newline;
//   - 400 for a malformed body or checkpoint, or a checkpoint size below
//     the old size;
//   - 403 if no valid signature by the log's registered key is present;
//   - 404 for an unknown origin (and for any other path);
//   - 405 for a method other than POST;
//   - 409 with Content-Type text/x.tlog.size and body "<size>\n" if the
//     old size is not the witness's size for the log;
//   - 409 (text/plain) if the old size equals the checkpoint size but the
//     root hash differs from the one the witness cosigned: a fork;
//   - 413 for a body over MaxAddCheckpointBody;
//   - 422 if the consistency proof does not verify;
//   - 503 if the signing key failed or the request's context ended
//     (retry), 500 for any other failure, each with a request ID that is
//     also logged.
//
// It is safe for concurrent use.
type WitnessHandler struct {
	w     *signing.Witness
	log   *slog.Logger
	audit Auditor
}

// Audited makes the handler record each add-checkpoint in a (durably,
// before it runs and before the reply, as the gRPC SignCheckpoint is):
// a request the log cannot record is refused with 503.
func (h *WitnessHandler) Audited(a Auditor) *WitnessHandler {
	h.audit = a
	return h
}

var _ http.Handler = (*WitnessHandler)(nil)

// NewWitnessHandler returns the add-checkpoint handler of w (as
// NewWitnessService requires it). lg receives signing failures and
// internal errors, never request contents; nil discards them.
func NewWitnessHandler(w *signing.Witness, lg *slog.Logger) (*WitnessHandler, error) {
	pw, err := prepareWitness(w)
	if err != nil {
		return nil, err
	}
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	return &WitnessHandler{w: pw, log: lg}, nil
}

// ServeHTTP implements http.Handler.
func (h *WitnessHandler) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	if r.URL.Path != AddCheckpointPath {
		http.NotFound(rw, r)
		return
	}
	if r.Method != http.MethodPost {
		rw.Header().Set("Allow", http.MethodPost)
		http.Error(rw, "add-checkpoint takes POST", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(rw, r.Body, int64(MaxAddCheckpointBody)))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		http.Error(rw, fmt.Sprintf("request body exceeds the limit of %d bytes", MaxAddCheckpointBody), http.StatusRequestEntityTooLarge)
		return
	}
	if err != nil {
		http.Error(rw, "reading the request body failed", http.StatusBadRequest)
		return
	}
	oldSize, proof, cp, err := parseAddCheckpoint(body)
	id := newRequestID()
	e := audit.Entry{RequestID: id, Caller: "http:" + r.RemoteAddr, Method: "add-checkpoint", Detail: checkpointSummary(cp, oldSize)}
	if !h.record(r.Context(), rw, e, audit.KindRequest) {
		return
	}
	rec := &statusRecorder{ResponseWriter: rw, code: http.StatusOK}
	if err == nil {
		var sigs []byte
		if sigs, err = h.w.AddCheckpoint(r.Context(), oldSize, proof, cp); err == nil {
			if !h.record(r.Context(), rw, withCode(e, http.StatusOK), audit.KindResponse) {
				return
			}
			rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
			rw.Write(sigs)
			return
		}
	}
	h.writeError(r.Context(), rec, err, oldSize, len(proof), cp)
	h.record(r.Context(), nil, withCode(e, rec.code), audit.KindResponse)
}

// record appends e durably as kind; if it cannot and rw is set, it
// answers 503 and reports false.
func (h *WitnessHandler) record(ctx context.Context, rw http.ResponseWriter, e audit.Entry, kind string) bool {
	if h.audit == nil {
		return true
	}
	e.Kind = kind
	if err := h.audit.Append(context.WithoutCancel(ctx), e, true); err != nil {
		h.log.LogAttrs(ctx, slog.LevelError, "audit log refused an add-checkpoint entry", slog.String("request_id", e.RequestID), slog.Any("error", err))
		if rw != nil {
			http.Error(rw, fmt.Sprintf("the audit log cannot record this request; retry later (request id %s)", e.RequestID), http.StatusServiceUnavailable)
		}
		return false
	}
	return true
}

func withCode(e audit.Entry, code int) audit.Entry {
	e.Code = strconv.Itoa(code)
	return e
}

// statusRecorder remembers the status written through it.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (s *statusRecorder) WriteHeader(code int) {
	s.code = code
	s.ResponseWriter.WriteHeader(code)
}

// writeError answers a refused or failed add-checkpoint.
func (h *WitnessHandler) writeError(ctx context.Context, rw http.ResponseWriter, err error, oldSize uint64, proofLen int, cp []byte) {
	var ce *signing.ConflictError
	switch {
	case errors.As(err, &ce):
		rw.Header().Set("Content-Type", SizeContentType)
		rw.Header().Set("X-Content-Type-Options", "nosniff")
		rw.WriteHeader(http.StatusConflict)
		fmt.Fprintf(rw, "%d\n", ce.Size)
	case errors.Is(err, signing.ErrUnknownOrigin):
		http.Error(rw, err.Error(), http.StatusNotFound)
	case errors.Is(err, signing.ErrBadLogSignature):
		http.Error(rw, err.Error(), http.StatusForbidden)
	case errors.Is(err, signing.ErrBadProof) && isSameSizeFork(oldSize, proofLen, cp):
		// tlog-witness: at equal sizes, different root hashes are a 409.
		http.Error(rw, fmt.Sprintf("%v: the root hash differs from the one cosigned at size %d", signing.ErrBadProof, oldSize), http.StatusConflict)
	case errors.Is(err, signing.ErrBadProof):
		http.Error(rw, err.Error(), http.StatusUnprocessableEntity)
	case errors.Is(err, signing.ErrMalformed):
		http.Error(rw, err.Error(), http.StatusBadRequest)
	case errors.Is(err, errSigner), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		id := newRequestID()
		h.log.LogAttrs(ctx, slog.LevelWarn, "add-checkpoint unavailable", slog.String("request_id", id), slog.Any("error", err))
		http.Error(rw, fmt.Sprintf("the witness is unavailable; retry later (request id %s)", id), http.StatusServiceUnavailable)
	default:
		id := newRequestID()
		h.log.LogAttrs(ctx, slog.LevelError, "internal error", slog.String("request_id", id), slog.Any("error", err))
		http.Error(rw, fmt.Sprintf("internal error (request id %s)", id), http.StatusInternalServerError)
	}
}

// isSameSizeFork reports whether a proof failure is the spec's root hash
// mismatch at equal sizes: a non-zero old size equal to the checkpoint's
// size, with the (required) empty proof.
func isSameSizeFork(oldSize uint64, proofLen int, cp []byte) bool {
	var c log.Checkpoint
	_, err := c.Unmarshal(cp)
	return err == nil && oldSize > 0 && c.Size == oldSize && proofLen == 0
}

// parseAddCheckpoint splits an add-checkpoint body: "old <size>\n", zero or
// more base64 hash lines, an empty line, then the checkpoint note. Errors
// match signing.ErrMalformed.
func parseAddCheckpoint(body []byte) (oldSize uint64, proof [][]byte, cp []byte, err error) {
	line, rest, ok := bytes.Cut(body, []byte("\n"))
	if !ok {
		return 0, nil, nil, fmt.Errorf("%w: no old size line", signing.ErrMalformed)
	}
	digits, ok := bytes.CutPrefix(line, []byte("old "))
	if !ok {
		return 0, nil, nil, fmt.Errorf("%w: the first line is not \"old <size>\"", signing.ErrMalformed)
	}
	if oldSize, err = parseDecimal(digits); err != nil {
		return 0, nil, nil, fmt.Errorf("%w: old size: %v", signing.ErrMalformed, err)
	}
	for {
		line, rest, ok = bytes.Cut(rest, []byte("\n"))
		switch {
		case !ok:
			return 0, nil, nil, fmt.Errorf("%w: no empty line before the checkpoint", signing.ErrMalformed)
		case len(line) == 0:
			return oldSize, proof, rest, nil
		case len(proof) == signing.MaxProofHashes:
			return 0, nil, nil, fmt.Errorf("%w: more than %d consistency proof lines", signing.ErrMalformed, signing.MaxProofHashes)
		}
		h, err := base64.StdEncoding.DecodeString(string(line))
		if err != nil || len(h) != 32 || base64.StdEncoding.EncodeToString(h) != string(line) {
			return 0, nil, nil, fmt.Errorf("%w: consistency proof line %d is not a base64 32-byte hash", signing.ErrMalformed, len(proof)+1)
		}
		proof = append(proof, h)
	}
}

// parseDecimal parses an ASCII decimal with no sign and no leading zeroes
// (unless it is "0").
func parseDecimal(b []byte) (uint64, error) {
	if len(b) == 0 || len(b) > 1 && b[0] == '0' {
		return 0, errors.New("not a canonical decimal")
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, errors.New("not a canonical decimal")
		}
	}
	n, err := strconv.ParseUint(string(b), 10, 64)
	if err != nil {
		return 0, errors.New("out of range")
	}
	return n, nil
}
