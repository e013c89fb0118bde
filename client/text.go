package client

import (
	"fmt"
	"strings"

	"github.com/hsmd/hsmd/envelope/wire"
)

// TextPrefix starts the text form of a ciphertext.
const TextPrefix = wire.TextPrefix

// ToText returns the text form of a binary ciphertext: TextPrefix followed
// by its unpadded base64url encoding (docs/FORMAT.md). It is meant for JSON
// and terminals; the server accepts it wherever it accepts a binary
// ciphertext.
func ToText(ct []byte) string { return wire.EncodeText(ct) }

// FromText returns the binary ciphertext of a text form, ignoring
// surrounding whitespace. Errors wrap [ErrMalformed] and do not quote the
// input. It checks the encoding only: whether the bytes are a valid
// ciphertext is for the server to say.
func FromText(s string) ([]byte, error) {
	ct, err := wire.DecodeText([]byte(s))
	if err != nil {
		// wire's message names the defect, never the input.
		return nil, fmt.Errorf("%w: %s", ErrMalformed, strings.TrimPrefix(err.Error(), wire.ErrMalformed.Error()+": "))
	}
	if len(ct) == 0 {
		return nil, fmt.Errorf("%w: empty text form", ErrMalformed)
	}
	return ct, nil
}
