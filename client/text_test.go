package client

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestTextRoundTrip(t *testing.T) {
	for _, ct := range [][]byte{{0}, {0xff, 0xfe}, []byte("hello"), bytes.Repeat([]byte{0xfb}, 100)} {
		s := ToText(ct)
		if !strings.HasPrefix(s, "hsmd:v1:") || strings.ContainsAny(s[len(TextPrefix):], "+/=") {
			t.Errorf("ToText(%x) = %q: want hsmd:v1: and unpadded base64url", ct, s)
		}
		for _, in := range []string{s, "  " + s + "\n", "\t" + s + "\r\n"} {
			got, err := FromText(in)
			if err != nil || !bytes.Equal(got, ct) {
				t.Errorf("FromText(%q) = %x, %v; want %x", in, got, err, ct)
			}
		}
	}
	if got := ToText([]byte{0xfb, 0xff}); got != "hsmd:v1:-_8" {
		t.Errorf("ToText = %q, want hsmd:v1:-_8", got)
	}
}

func TestFromTextBad(t *testing.T) {
	for _, in := range []string{
		"",
		"   ",
		"hsmd:v1:",
		"hsmd:v2:AAAA",
		"HSMD:V1:AAAA",
		"AAAA",
		"hsmd:v1:AA==",   // padded
		"hsmd:v1:+/8",    // standard alphabet
		"hsmd:v1:A",      // impossible length
		"hsmd:v1:AB",     // non-zero trailing bits
		"hsmd:v1:AA AA",  // inner space
		"hsmd:v1:AA\nAA", // inner newline
		"hsmd:v1:AA\rAA",
		"x hsmd:v1:AAAA",
	} {
		ct, err := FromText(in)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("FromText(%q) = %x, %v; want ErrMalformed", in, ct, err)
		}
	}
	// Errors never quote the input.
	_, err := FromText("hsmd:v1:c2VjcmV0!")
	if err == nil || strings.Contains(err.Error(), "c2VjcmV0") {
		t.Errorf("FromText error %v quotes its input", err)
	}
}

func FuzzFromText(f *testing.F) {
	for _, s := range []string{"hsmd:v1:AAAA", "hsmd:v1:-_8", " hsmd:v1:aGVsbG8\n", "hsmd:v1:", "hsmd:v1:AA==", "junk"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ct, err := FromText(s)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("FromText error %v does not wrap ErrMalformed", err)
			}
			return
		}
		// A text form has exactly one spelling, up to surrounding space.
		if got := ToText(ct); got != strings.TrimSpace(s) {
			t.Fatalf("ToText(FromText(%q)) = %q", s, got)
		}
	})
}

func FuzzToText(f *testing.F) {
	for _, b := range [][]byte{{0}, []byte("hello"), {0xff, 0xfe, 0xfd}} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, ct []byte) {
		got, err := FromText(ToText(ct))
		if len(ct) == 0 {
			if err == nil {
				t.Fatal("FromText accepted an empty text form")
			}
			return
		}
		if err != nil || !bytes.Equal(got, ct) {
			t.Fatalf("round trip of %x: %x, %v", ct, got, err)
		}
	})
}
