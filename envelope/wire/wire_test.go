package wire_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/hsmd/hsmd/envelope/wire"
)

func sample() []byte {
	b := make([]byte, wire.Overhead+5)
	h := wire.Header{Version: wire.Version1, Suite: wire.SuiteAES256GCM, TenantID: 0x0102030405060708, KeyVersion: 3}
	copy(h.Seed[:], "0123456789abcdef")
	copy(h.Nonce[:], "nonce-nonce!")
	h.Put(b)
	return b
}

// FuzzParse: whatever parses writes back to the same header bytes.
func FuzzParse(f *testing.F) {
	f.Add(sample())
	f.Add([]byte{})
	f.Add([]byte{1, 1})
	f.Add(bytes.Repeat([]byte{1}, wire.Overhead))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, body, err := wire.Parse(data)
		if err != nil {
			if !errors.Is(err, wire.ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		out := make([]byte, wire.HeaderSize)
		h.Put(out)
		if !bytes.Equal(out, data[:wire.HeaderSize]) || !bytes.Equal(body, data[wire.HeaderSize:]) {
			t.Fatal("parse and put do not round-trip")
		}
	})
}

// FuzzText: text form decoding round-trips, and only canonical text decodes.
func FuzzText(f *testing.F) {
	f.Add([]byte(wire.EncodeText(sample())))
	f.Add([]byte("hsmd:v1:"))
	f.Add([]byte("hsmd:v1:AB"))
	f.Add([]byte(" hsmd:v1:AQE\n"))
	f.Add([]byte("hsmd:v1:AQ\nE"))
	f.Add([]byte("\vhsmd:v1:AQE"))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := wire.DecodeText(data)
		if err != nil {
			if !errors.Is(err, wire.ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if got := wire.EncodeText(b); got != string(bytes.TrimSpace(data)) {
			t.Fatalf("decoded %q, re-encoded %q", data, got)
		}
	})
}

func TestTextFormIsCanonical(t *testing.T) {
	good := wire.EncodeText(sample())
	for _, bad := range []string{good[:12] + "\n" + good[12:], good[:12] + "\r" + good[12:], good + "=", good[:len(good)-1] + "+"} {
		if _, err := wire.DecodeText([]byte(bad)); !errors.Is(err, wire.ErrMalformed) {
			t.Errorf("%q decoded: %v", bad, err)
		}
	}
	if !wire.IsText([]byte("\v" + good)) {
		t.Error("IsText and DecodeText disagree on leading whitespace")
	}
}

func TestParseErrors(t *testing.T) {
	s := sample()
	for name, in := range map[string][]byte{
		"short":   s[:wire.Overhead-1],
		"version": append([]byte{2}, s[1:]...),
		"suite":   append([]byte{1, 9}, s[2:]...),
	} {
		if _, _, err := wire.Parse(in); !errors.Is(err, wire.ErrMalformed) {
			t.Errorf("%s: got %v", name, err)
		}
	}
	if _, _, err := wire.Parse(s); err != nil {
		t.Fatal(err)
	}
}

func TestContextEncodingIsCanonical(t *testing.T) {
	a := wire.AppendContext(nil, map[string]string{"b": "2", "a": "1", "c": ""})
	for range 20 { // map iteration order varies
		if b := wire.AppendContext(nil, map[string]string{"c": "", "a": "1", "b": "2"}); !bytes.Equal(a, b) {
			t.Fatal("context encoding depends on map order")
		}
	}
	// Length prefixes keep ("ab","c") and ("a","bc") apart.
	if bytes.Equal(wire.AppendContext(nil, map[string]string{"ab": "c"}), wire.AppendContext(nil, map[string]string{"a": "bc"})) {
		t.Fatal("ambiguous context encoding")
	}
	if n := wire.ContextSize(map[string]string{"b": "2", "a": "1", "c": ""}); n != len(a) {
		t.Fatalf("ContextSize %d, encoding %d", n, len(a))
	}
}
