package signing

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

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

// ErrNotCanonical: a signed note's signature lines are malformed or not in
// canonical base64.
var ErrNotCanonical = errors.New("signing: note signatures are not canonical")

// CheckCanonical refuses a signed note whose signature lines are not
// "— name base64" with canonical (strict) base64: lenient decoding ignores
// the padding bits of the last character, so a stored note could change
// in a byte and still verify. Verify does not check this; callers that
// promise tamper-evidence byte for byte do.
func CheckCanonical(n []byte) error {
	_, sigs, ok := bytes.Cut(n, []byte("\n\n"))
	if !ok {
		return fmt.Errorf("%w: no signature block", ErrNotCanonical)
	}
	for _, line := range strings.Split(strings.TrimSuffix(string(sigs), "\n"), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != "\u2014" {
			return fmt.Errorf("%w: malformed signature line", ErrNotCanonical)
		}
		if _, err := base64.StdEncoding.Strict().DecodeString(f[2]); err != nil {
			return fmt.Errorf("%w: the signature by %s", ErrNotCanonical, f[1])
		}
	}
	return nil
}
