package signing

import (
	"errors"
	"fmt"

	"golang.org/x/mod/sumdb/note"
)

// ErrMissingSignature: a note lacks a valid signature from a demanded
// verifier.
var ErrMissingSignature = errors.New("signing: note is missing a required signature")

// Verify checks that msg is a signed note carrying a valid signature from
// EVERY verifier given (for example a classical and a post-quantum one).
// Signatures by other keys are ignored; a signature that claims a given
// verifier's name and key hash but does not verify is an error
// (*note.InvalidSignatureError, via errors.As). A missing signature gives
// ErrMissingSignature. At least one verifier is required.
func Verify(msg []byte, verifiers ...note.Verifier) error {
	if len(verifiers) == 0 {
		return errors.New("signing: verify: no verifiers given")
	}
	n, err := note.Open(msg, note.VerifierList(verifiers...))
	if err != nil {
		var unverified *note.UnverifiedNoteError
		if errors.As(err, &unverified) {
			return fmt.Errorf("%w: none of %d verifiers signed", ErrMissingSignature, len(verifiers))
		}
		return fmt.Errorf("signing: verify: %w", err)
	}
	type nameHash struct {
		name string
		hash uint32
	}
	signed := make(map[nameHash]bool, len(n.Sigs))
	for _, sig := range n.Sigs {
		signed[nameHash{sig.Name, sig.Hash}] = true
	}
	for _, v := range verifiers {
		if !signed[nameHash{v.Name(), v.KeyHash()}] {
			return fmt.Errorf("%w: %s+%08x", ErrMissingSignature, v.Name(), v.KeyHash())
		}
	}
	return nil
}
