package quorum

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"
)

// Fixed parts of the request text (see the package doc).
const (
	// RequestOrigin is the first line of every request text.
	RequestOrigin = "hsmd approval request v1"
	requestSize   = "1"
	requestLabel  = "hsmd quorum request v1\x00"
	// NonceSize is the number of random bytes in a request nonce.
	NonceSize = 16
	// MaxRequestSize bounds request text; MaxNoteSize bounds a request with
	// its signatures (x/mod/sumdb/note reads at most 100 signatures).
	MaxRequestSize = 64 << 10
	MaxNoteSize    = 1 << 20
)

// Request asks operators to approve Op once, before Expires. Its text form
// (MarshalText) is what they sign.
type Request struct {
	Op      Operation
	Nonce   string    // NonceSize random bytes in lowercase hex
	Created time.Time // UTC, whole seconds
	Expires time.Time // UTC, whole seconds, after Created
}

// NewRequest returns a request for op, created now and expiring at expires
// (both truncated to the second), with a nonce read from rand (crypto/rand
// if nil). It panics if rand fails, as crypto/rand does. op and the times
// are checked by MarshalText.
func NewRequest(op Operation, expires time.Time, rand io.Reader) *Request {
	if rand == nil {
		rand = cryptoRand
	}
	var n [NonceSize]byte
	if _, err := io.ReadFull(rand, n[:]); err != nil {
		panic("quorum: reading nonce: " + err.Error())
	}
	return &Request{
		Op:      Operation{Kind: op.Kind, Params: maps.Clone(op.Params)},
		Nonce:   hex.EncodeToString(n[:]),
		Created: time.Now().UTC().Truncate(time.Second),
		Expires: expires.UTC().Truncate(time.Second),
	}
}

var cryptoRand = rand.Reader

// Digest is r.Op.Digest().
func (r *Request) Digest() [32]byte { return r.Op.Digest() }

// MarshalText returns the request text. Errors wrap ErrInvalidOperation or
// ErrMalformedRequest (a bad nonce, times not in whole UTC seconds, or
// Expires not after Created).
func (r *Request) MarshalText() ([]byte, error) {
	body, err := r.body()
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(append([]byte(requestLabel), body...))
	var b bytes.Buffer
	b.WriteString(RequestOrigin + "\n" + requestSize + "\n")
	b.WriteString(base64.StdEncoding.EncodeToString(sum[:]) + "\n")
	b.Write(body)
	return b.Bytes(), nil
}

func (r *Request) body() ([]byte, error) {
	if err := r.Op.Validate(); err != nil {
		return nil, err
	}
	if n, err := hex.DecodeString(r.Nonce); err != nil || len(n) != NonceSize || hex.EncodeToString(n) != r.Nonce {
		return nil, fmt.Errorf("%w: nonce must be %d lowercase hex digits", ErrMalformedRequest, 2*NonceSize)
	}
	for _, t := range []time.Time{r.Created, r.Expires} {
		if t.Location() != time.UTC || !t.Equal(t.Truncate(time.Second)) || t.Year() < 1 || t.Year() > 9999 {
			return nil, fmt.Errorf("%w: times must be UTC, in whole seconds, years 1-9999", ErrMalformedRequest)
		}
	}
	if !r.Expires.After(r.Created) {
		return nil, fmt.Errorf("%w: expires %s is not after created %s", ErrMalformedRequest, fmtTime(r.Expires), fmtTime(r.Created))
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "kind %s\n", r.Op.Kind)
	for _, k := range slices.Sorted(maps.Keys(r.Op.Params)) {
		fmt.Fprintf(&b, "param %s %s\n", k, r.Op.Params[k])
	}
	d := r.Digest()
	fmt.Fprintf(&b, "digest sha256:%x\n", d[:])
	fmt.Fprintf(&b, "nonce %s\n", r.Nonce)
	fmt.Fprintf(&b, "created %s\n", fmtTime(r.Created))
	fmt.Fprintf(&b, "expires %s\n", fmtTime(r.Expires))
	return b.Bytes(), nil
}

func fmtTime(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// ParseRequest parses request text (without signatures). It is strict: it
// accepts only text that MarshalText would produce, so a hash line or
// digest that does not match the rest (text altered after it was made)
// is refused. Errors wrap ErrMalformedRequest or ErrInvalidOperation.
func ParseRequest(text []byte) (*Request, error) {
	if len(text) > MaxRequestSize {
		return nil, fmt.Errorf("%w: over %d bytes", ErrMalformedRequest, MaxRequestSize)
	}
	if len(text) == 0 || text[len(text)-1] != '\n' {
		return nil, fmt.Errorf("%w: must end with a newline", ErrMalformedRequest)
	}
	lines := strings.Split(string(text[:len(text)-1]), "\n")
	if len(lines) < 3 || lines[0] != RequestOrigin || lines[1] != requestSize {
		return nil, fmt.Errorf("%w: does not start with %q and %q", ErrMalformedRequest, RequestOrigin, requestSize)
	}
	r, err := parseBody(lines[3:])
	if err != nil {
		return nil, err
	}
	want, err := r.MarshalText()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(want, text) {
		wantLines := strings.SplitN(string(want), "\n", 4)
		if lines[2] != wantLines[2] {
			return nil, fmt.Errorf("%w: line 3 does not hash the request (altered after it was made?)", ErrMalformedRequest)
		}
		return nil, fmt.Errorf("%w: not in canonical form", ErrMalformedRequest)
	}
	return r, nil
}

// parseBody reads the lines after the hash line. MarshalText then checks
// the values and ParseRequest that they round-trip.
func parseBody(lines []string) (*Request, error) {
	r := &Request{Op: Operation{Params: map[string]string{}}}
	next := func(word string) (string, error) {
		if len(lines) == 0 {
			return "", fmt.Errorf("%w: missing %q line", ErrMalformedRequest, word)
		}
		v, ok := strings.CutPrefix(lines[0], word+" ")
		if !ok {
			return "", fmt.Errorf("%w: want a %q line, got %.40q", ErrMalformedRequest, word, lines[0])
		}
		lines = lines[1:]
		return v, nil
	}
	var err error
	if r.Op.Kind, err = next("kind"); err != nil {
		return nil, err
	}
	for len(lines) > 0 && strings.HasPrefix(lines[0], "param ") {
		p, _ := next("param")
		k, v, ok := strings.Cut(p, " ")
		if _, dup := r.Op.Params[k]; !ok || dup {
			return nil, fmt.Errorf("%w: param %.40q: want \"param KEY VALUE\", each key once", ErrMalformedRequest, k)
		}
		r.Op.Params[k] = v
	}
	digest, err := next("digest")
	if err != nil {
		return nil, err
	}
	if r.Nonce, err = next("nonce"); err != nil {
		return nil, err
	}
	for _, f := range []struct {
		word string
		t    *time.Time
	}{{"created", &r.Created}, {"expires", &r.Expires}} {
		s, err := next(f.word)
		if err != nil {
			return nil, err
		}
		if *f.t, err = time.Parse(time.RFC3339, s); err != nil {
			return nil, fmt.Errorf("%w: %s is not an RFC 3339 time", ErrMalformedRequest, f.word)
		}
		*f.t = f.t.UTC()
	}
	if len(lines) > 0 {
		return nil, fmt.Errorf("%w: unexpected line after expires", ErrMalformedRequest)
	}
	if d := r.Digest(); digest != fmt.Sprintf("sha256:%x", d[:]) {
		return nil, fmt.Errorf("%w: digest does not match kind and params (altered after it was made?)", ErrMalformedRequest)
	}
	return r, nil
}

// ParseNote parses a request file: request text, then optionally a blank
// line and signed-note signature lines. The signatures are returned as
// written, NOT verified (use Policy.Verify), identical lines once. Errors
// wrap ErrMalformedRequest or ErrMalformedNote.
func ParseNote(b []byte) (*Request, []note.Signature, error) {
	text, sigs, err := splitNote(b)
	if err != nil {
		return nil, nil, err
	}
	r, err := ParseRequest(text)
	if err != nil {
		return nil, nil, err
	}
	return r, sigs, nil
}

// splitNote separates text and signatures. Request text has no blank line,
// so a file without one is text alone.
func splitNote(b []byte) ([]byte, []note.Signature, error) {
	if len(b) > MaxNoteSize {
		return nil, nil, fmt.Errorf("%w: over %d bytes", ErrMalformedNote, MaxNoteSize)
	}
	if !bytes.Contains(b, []byte("\n\n")) {
		return b, nil, nil
	}
	// With no verifiers every signature is unverified: note.Open then does
	// only the syntax checks and returns them in an UnverifiedNoteError.
	_, err := note.Open(b, note.VerifierList())
	var u *note.UnverifiedNoteError
	if !errors.As(err, &u) {
		return nil, nil, fmt.Errorf("%w: %v", ErrMalformedNote, err)
	}
	return []byte(u.Note.Text), u.Note.UnverifiedSigs, nil
}
