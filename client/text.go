package client

import (
	"encoding/base64"
	"fmt"
	"strings"
)

// TextPrefix starts the text form of a ciphertext.
const TextPrefix = "hsmd:v1:"

// textEncoding is unpadded base64url; Strict rejects non-zero trailing
// bits, so every ciphertext has exactly one text form.
var textEncoding = base64.RawURLEncoding.Strict()

// ToText returns the text form of a binary ciphertext: TextPrefix followed
// by its unpadded base64url encoding. It is meant for JSON and terminals;
// the server accepts it wherever it accepts a binary ciphertext. (No
// ciphertext is empty; the text form of an empty slice does not parse.)
func ToText(ct []byte) string {
	return TextPrefix + textEncoding.EncodeToString(ct)
}

// FromText returns the binary ciphertext of a text form, ignoring
// surrounding whitespace. Errors wrap [ErrMalformed] and do not quote the
// input. It checks the encoding only: whether the bytes are a valid
// ciphertext is for the server to say.
func FromText(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	b64, ok := strings.CutPrefix(s, TextPrefix)
	if !ok {
		return nil, fmt.Errorf("%w: text form must start with %q", ErrMalformed, TextPrefix)
	}
	if b64 == "" {
		return nil, fmt.Errorf("%w: empty text form", ErrMalformed)
	}
	// The decoder skips \r and \n; refuse them so a text form is canonical.
	ct, err := textEncoding.DecodeString(b64)
	if err != nil || strings.ContainsAny(b64, "\r\n") {
		return nil, fmt.Errorf("%w: text form is not unpadded base64url", ErrMalformed)
	}
	return ct, nil
}
