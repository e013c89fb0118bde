package quorum

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/mod/sumdb/note"
)

// maxSigs is x/mod/sumdb/note's limit on signatures in one note.
const maxSigs = 100

// Approve adds signer's note signature to a request file (request text,
// with or without signatures) and returns the new file. Signatures already
// there are kept, except signer's own earlier one, which is replaced. It
// checks the text is a well-formed request, not whether it has expired:
// show the operator ParseNote's Request first. The signer must sign the
// full text: x/mod/sumdb/note Ed25519 signers and formats' ML-DSA-44
// signers (see NewSigner) do. Errors wrap ErrMalformedRequest or
// ErrMalformedNote, or are the signer's.
func Approve(requestNote []byte, signer note.Signer) ([]byte, error) {
	text, sigs, err := splitNote(requestNote)
	if err != nil {
		return nil, err
	}
	if _, err := ParseRequest(text); err != nil {
		return nil, err
	}
	out, err := note.Sign(&note.Note{Text: string(text), UnverifiedSigs: sigs}, signer)
	if err != nil {
		return nil, fmt.Errorf("quorum: signing as %s: %w", signer.Name(), err)
	}
	return out, nil
}

// Merge combines copies of one request signed separately. All must have
// the same request text (else ErrMergeMismatch). Signature lines keep their
// order of first appearance; of several by the same key (name and key
// hash), the first is kept. Signatures are not verified. Errors wrap
// ErrMalformedRequest, ErrMalformedNote or ErrMergeMismatch.
func Merge(notes ...[]byte) ([]byte, error) {
	if len(notes) == 0 {
		return nil, fmt.Errorf("%w: nothing to merge", ErrMalformedNote)
	}
	var text []byte
	var all []note.Signature
	seen := map[nameHash]bool{}
	for i, b := range notes {
		t, sigs, err := splitNote(b)
		if err != nil {
			return nil, fmt.Errorf("note %d: %w", i+1, err)
		}
		if i == 0 {
			if _, err := ParseRequest(t); err != nil {
				return nil, fmt.Errorf("note 1: %w", err)
			}
			text = t
		} else if !bytes.Equal(t, text) {
			return nil, fmt.Errorf("%w: note %d differs from note 1", ErrMergeMismatch, i+1)
		}
		for _, s := range sigs {
			if k := (nameHash{s.Name, s.Hash}); !seen[k] {
				seen[k] = true
				all = append(all, s)
			}
		}
	}
	if len(all) == 0 {
		return text, nil
	}
	if len(all) > maxSigs {
		return nil, fmt.Errorf("%w: %d signatures, at most %d", ErrMalformedNote, len(all), maxSigs)
	}
	out, err := note.Sign(&note.Note{Text: string(text), UnverifiedSigs: all})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformedNote, err)
	}
	return out, nil
}

// Approval is the result of a successful Policy.Verify.
type Approval struct {
	Request   *Request
	Nonce     string   // Request.Nonce: spend it before running the operation
	Approvers []string // distinct registered operators with a valid signature, sorted
	Ignored   []string // names on signatures by keys not in the policy
}

// Verify checks that approved (a request file with signatures) authorizes
// want at time now:
//
//   - the request text parses (ErrMalformedRequest, ErrMalformedNote);
//   - it is a request for want: same digest (ErrWrongOperation);
//   - now is before its expiry (ErrExpired), and it expires within
//     MaxValidity of both its creation and now (ErrValidityTooLong);
//   - at least Threshold distinct registered operators signed it: an
//     operator counts once however often they signed, signatures by other
//     keys are ignored (*TooFewApprovalsError, matching
//     ErrTooFewApprovals), and a signature claiming a registered key that
//     does not verify is an error (ErrInvalidSignature).
//
// An invalid policy gives ErrInvalidPolicy; an invalid want,
// ErrInvalidOperation. Verify does not record the nonce: see Authorize.
func (p *Policy) Verify(approved []byte, want Operation, now time.Time) (*Approval, error) {
	vs, byKey, err := p.verifiers()
	if err != nil {
		return nil, err
	}
	if err := want.Validate(); err != nil {
		return nil, err
	}
	req, sigs, err := ParseNote(approved)
	if err != nil {
		return nil, err
	}
	if req.Digest() != want.Digest() {
		return nil, fmt.Errorf("%w: approved %s, want %s", ErrWrongOperation, req.Op, want)
	}
	if !now.Before(req.Expires) {
		return nil, fmt.Errorf("%w at %s", ErrExpired, fmtTime(req.Expires))
	}
	if v := req.Expires.Sub(req.Created); v > p.MaxValidity {
		return nil, fmt.Errorf("%w: valid for %v from creation, at most %v", ErrValidityTooLong, v, p.MaxValidity)
	}
	if v := req.Expires.Sub(now); v > p.MaxValidity {
		return nil, fmt.Errorf("%w: expires in %v, at most %v", ErrValidityTooLong, v.Round(time.Second), p.MaxValidity)
	}
	a := &Approval{Request: req, Nonce: req.Nonce}
	if len(sigs) > 0 {
		if a.Approvers, a.Ignored, err = approvers(approved, vs, byKey); err != nil {
			return nil, err
		}
	}
	if len(a.Approvers) < p.Threshold {
		return nil, &TooFewApprovalsError{Valid: len(a.Approvers), Needed: p.Threshold, Approvers: a.Approvers}
	}
	return a, nil
}

// approvers verifies the signatures on approved and returns the distinct
// operators with a valid one and the names on signatures by unknown keys,
// both sorted.
func approvers(approved []byte, vs []note.Verifier, byKey map[nameHash]string) (ok, ignored []string, err error) {
	n, err := note.Open(approved, note.VerifierList(vs...))
	var inv *note.InvalidSignatureError
	var unv *note.UnverifiedNoteError
	switch {
	case errors.As(err, &inv):
		return nil, nil, fmt.Errorf("%w by %s (key hash %08x)", ErrInvalidSignature, inv.Name, inv.Hash)
	case errors.As(err, &unv):
		n = unv.Note
	case err != nil:
		return nil, nil, fmt.Errorf("%w: %v", ErrMalformedNote, err)
	}
	for _, s := range n.Sigs {
		if name, known := byKey[nameHash{s.Name, s.Hash}]; known && !slices.Contains(ok, name) {
			ok = append(ok, name)
		}
	}
	for _, s := range n.UnverifiedSigs {
		ignored = append(ignored, s.Name)
	}
	slices.Sort(ok)
	slices.Sort(ignored)
	return ok, slices.Compact(ignored), nil
}

// Spent records the nonces of requests that have been acted on.
// Implementations must be safe for concurrent use.
type Spent interface {
	// Spend records nonce, valid until expires. It returns an error
	// matching ErrReplayed if nonce was recorded before, and must not
	// return nil for a nonce twice.
	Spend(ctx context.Context, nonce string, expires time.Time) error
}

// Authorize is Verify followed by spent.Spend of the request's nonce: the
// safe way to gate an operation. On success the caller runs the operation
// once; the same approval presented again fails with ErrReplayed, and
// presented for another operation with ErrWrongOperation.
func (p *Policy) Authorize(ctx context.Context, spent Spent, approved []byte, want Operation, now time.Time) (*Approval, error) {
	a, err := p.Verify(approved, want, now)
	if err != nil {
		return nil, err
	}
	if err := spent.Spend(ctx, a.Nonce, a.Request.Expires); err != nil {
		return nil, err
	}
	return a, nil
}
