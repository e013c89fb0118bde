package quorum_test

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hsmd/hsmd/quorum"
)

func TestOperationDigest(t *testing.T) {
	a := quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{"key": "k", "version": "3"}}
	b := quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{"version": "3", "key": "k"}}
	if a.Digest() != b.Digest() {
		t.Fatal("the digest depends on map order")
	}
	seen := map[[32]byte]string{}
	for _, o := range []quorum.Operation{
		a,
		{Kind: quorum.KindDestroyVersion, Params: map[string]string{"key": "k", "version": "4"}},
		{Kind: quorum.KindDestroyVersion, Params: map[string]string{"key": "k version 3"}},
		{Kind: quorum.KindDestroyVersion, Params: map[string]string{"key": "k"}},
		{Kind: quorum.KindDestroyVersion},
		{Kind: quorum.KindDestroyVersion, Params: map[string]string{}},
		{Kind: quorum.KindRotateKDK},
	} {
		d := o.Digest()
		if prev, dup := seen[d]; dup && prev != o.String() {
			t.Errorf("%s and %s share a digest", prev, o)
		}
		seen[d] = o.String()
	}
	if len(seen) != 6 { // nil and empty Params are the same operation
		t.Errorf("%d distinct digests, want 6", len(seen))
	}
}

func TestOperationValidate(t *testing.T) {
	for _, o := range []quorum.Operation{
		{Kind: "delete-everything"},
		{Kind: quorum.KindRestore, Params: map[string]string{"Token": "x"}},
		{Kind: quorum.KindRestore, Params: map[string]string{"-token": "x"}},
		{Kind: quorum.KindRestore, Params: map[string]string{"token label": "x"}},
		{Kind: quorum.KindRestore, Params: map[string]string{"token": ""}},
		{Kind: quorum.KindRestore, Params: map[string]string{"token": " x"}},
		{Kind: quorum.KindRestore, Params: map[string]string{"token": "x\nkind rotate-kdk"}},
		{Kind: quorum.KindRestore, Params: map[string]string{"token": "x\u202e"}},
		{Kind: quorum.KindRestore, Params: map[string]string{"token": strings.Repeat("x", quorum.MaxParamValueLen+1)}},
	} {
		if err := o.Validate(); !errors.Is(err, quorum.ErrInvalidOperation) {
			t.Errorf("%q: %v, want ErrInvalidOperation", o.String(), err)
		}
		r := quorum.NewRequest(o, time.Now().Add(time.Hour), nil)
		if _, err := r.MarshalText(); !errors.Is(err, quorum.ErrInvalidOperation) {
			t.Errorf("MarshalText of %q: %v", o.String(), err)
		}
	}
}

func TestRequestRoundTrip(t *testing.T) {
	op := quorum.Operation{Kind: quorum.KindRestore, Params: map[string]string{"token": "hsm-2", "backup": "roots 2026-02-28.bak"}}
	r := quorum.NewRequest(op, time.Now().Add(time.Hour), nil)
	text, err := r.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	got, err := quorum.ParseRequest(text)
	if err != nil {
		t.Fatal(err)
	}
	if got.Nonce != r.Nonce || !got.Created.Equal(r.Created) || !got.Expires.Equal(r.Expires) || got.Digest() != op.Digest() {
		t.Fatalf("round trip: %+v, want %+v", got, r)
	}
	for _, want := range []string{"hsmd approval request v1\n1\n", "\nkind restore\nparam backup roots 2026-02-28.bak\nparam token hsm-2\ndigest sha256:"} {
		if !bytes.Contains(text, []byte(want)) {
			t.Errorf("text lacks %q:\n%s", want, text)
		}
	}
	// Not before Created.
	r.Expires = r.Created
	if _, err := r.MarshalText(); !errors.Is(err, quorum.ErrMalformedRequest) {
		t.Errorf("expires == created: %v", err)
	}
}

func TestParseRequestStrict(t *testing.T) {
	text := request(t, shred("billing"), time.Hour)
	for name, edit := range map[string]func(string) string{
		"no final newline": func(s string) string { return strings.TrimSuffix(s, "\n") },
		"CRLF":             func(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") },
		"extra line":       func(s string) string { return s + "note hi\n" },
		"blank line":       func(s string) string { return s + "\n" },
		"other origin":     func(s string) string { return strings.Replace(s, "request v1", "request v2", 1) },
		"upper-case hex":   func(s string) string { return strings.Replace(s, "digest sha256:", "digest SHA256:", 1) },
		"offset time":      func(s string) string { return strings.Replace(s, "T13:00:00Z", "T14:00:00+01:00", 1) },
		"lines swapped": func(s string) string {
			return strings.Replace(s, "nonce", "created", 1)
		},
	} {
		if _, err := quorum.ParseRequest([]byte(edit(string(text)))); !errors.Is(err, quorum.ErrMalformedRequest) {
			t.Errorf("%s: %v, want ErrMalformedRequest", name, err)
		}
	}
}

// FuzzParseRequest: whatever ParseRequest accepts marshals back to the same
// bytes, and ParseNote agrees with it.
func FuzzParseRequest(f *testing.F) {
	seeds := 0
	for _, op := range []quorum.Operation{
		shred("billing"),
		{Kind: quorum.KindRotateKDK},
		{Kind: quorum.KindDestroyVersion, Params: map[string]string{"key": "payments", "version": "7"}},
	} {
		text := request(f, op, time.Hour)
		f.Add(text)
		f.Add(approve(f, text, newOperator(f, "alice", quorum.KeyEd25519)))
		seeds += 2
	}
	if seeds == 0 {
		f.Fatal("empty seed corpus")
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := quorum.ParseRequest(b)
		if err == nil {
			out, err := r.MarshalText()
			if err != nil || !bytes.Equal(out, b) {
				t.Fatalf("parsed but marshals to %q, %v", out, err)
			}
		}
		if r2, _, err := quorum.ParseNote(b); err == nil {
			if _, err := r2.MarshalText(); err != nil {
				t.Fatal(err)
			}
		}
	})
}
