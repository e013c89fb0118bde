package quorum

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrInvalidOperation: an Operation has an unknown kind or a parameter
	// key or value that cannot be written unambiguously.
	ErrInvalidOperation = errors.New("quorum: invalid operation")
	// ErrMalformedRequest: request text that ParseRequest does not accept,
	// including text altered after it was made (its hash line or digest
	// no longer matches).
	ErrMalformedRequest = errors.New("quorum: malformed approval request")
	// ErrMalformedNote: the signature block of an approval file is not
	// C2SP signed-note syntax.
	ErrMalformedNote = errors.New("quorum: malformed signed note")
	// ErrMergeMismatch: Merge was given notes over different request texts.
	ErrMergeMismatch = errors.New("quorum: notes approve different requests")
	// ErrWrongOperation: the approval is for another operation than the one
	// being authorized.
	ErrWrongOperation = errors.New("quorum: approval is for a different operation")
	// ErrExpired: the request's expiry has passed.
	ErrExpired = errors.New("quorum: approval request expired")
	// ErrValidityTooLong: the request is valid for longer than the policy's
	// MaxValidity (from its creation, or from now).
	ErrValidityTooLong = errors.New("quorum: approval request valid for longer than the policy allows")
	// ErrTooFewApprovals: fewer distinct registered operators signed than
	// the threshold. The error is a *TooFewApprovalsError.
	ErrTooFewApprovals = errors.New("quorum: too few approvals")
	// ErrInvalidSignature: a signature claims a registered operator's key
	// (name and key hash) but does not verify.
	ErrInvalidSignature = errors.New("quorum: invalid signature")
	// ErrReplayed: the request's nonce was spent before.
	ErrReplayed = errors.New("quorum: approval already used")
	// ErrInvalidPolicy: Policy.Validate failed.
	ErrInvalidPolicy = errors.New("quorum: invalid policy")
	// ErrInvalidKey: a verifier or private key string is malformed. Errors
	// about private keys never include the key.
	ErrInvalidKey = errors.New("quorum: invalid key")
	// ErrUnsupportedKey: a key's signature type is not Ed25519 (0x01) or
	// ML-DSA-44 (0x06).
	ErrUnsupportedKey = errors.New("quorum: unsupported key type")
)

// TooFewApprovalsError reports how many distinct registered operators
// approved (Valid, named in Approvers) and how many are Needed. It matches
// ErrTooFewApprovals with errors.Is.
type TooFewApprovalsError struct {
	Valid, Needed int
	Approvers     []string
}

func (e *TooFewApprovalsError) Error() string {
	s := fmt.Sprintf("%v: %d valid of %d needed", ErrTooFewApprovals, e.Valid, e.Needed)
	if len(e.Approvers) > 0 {
		s += " (approved by " + strings.Join(e.Approvers, ", ") + ")"
	}
	return s
}

// Is makes errors.Is(err, ErrTooFewApprovals) true.
func (e *TooFewApprovalsError) Is(target error) bool { return target == ErrTooFewApprovals }
