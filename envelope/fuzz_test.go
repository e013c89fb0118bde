package envelope_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/internal/vectors"
)

// FuzzOpen feeds arbitrary bytes to Open: it never panics, reports every
// failure as ErrMalformed or ErrDecrypt, and opens nothing but the one
// genuine ciphertext.
func FuzzOpen(f *testing.F) {
	e := newEngine(f, newPRF(), nil)
	a := ref("fuzz", 99)
	genuine, err := e.Seal(context.Background(), a, []envelope.Item{{Plaintext: []byte("secret")}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(genuine[0])
	vs, err := vectors.Load(vectorDir)
	if err != nil {
		f.Fatal(err)
	}
	for _, v := range vs {
		f.Add([]byte(v.Ciphertext))
		f.Add([]byte(v.Text))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		res := mustOpen(t, e, context.Background(), resolver("", a), []envelope.Ciphertext{{Data: data}})
		switch err := res[0].Err; {
		case err == nil:
			if !bytes.Equal(res[0].Plaintext, []byte("secret")) {
				t.Fatalf("opened %q", res[0].Plaintext)
			}
		case errors.Is(err, envelope.ErrMalformed), err == envelope.ErrDecrypt:
		default:
			t.Fatalf("unexpected error %v", err)
		}
	})
}
