package ctstream

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzRead: whatever a Reader accepts, a Writer writes back identically
// (the binary format has one encoding; text lines come back trimmed).
func FuzzRead(f *testing.F) {
	seeds := [][]byte{
		{0, 0, 0, 3, 'a', 'b', 'c', 0, 0, 0, 0},
		{0, 0, 0, 9, 'x'},
		{0xff, 0xff, 0xff, 0xff},
		[]byte("hsmd:v1:AAAA\n  hsmd:v1:BB\r\n"),
		[]byte("a\n\nb"),
	}
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, in []byte, text bool) {
		rr := NewReader(bytes.NewReader(in), text, 0, 0)
		var out bytes.Buffer
		rw := NewWriter(&out, text, 0)
		var recs [][]byte
		for {
			rec, err := rr.Next()
			if err != nil {
				var re *RecordError
				if err != io.EOF && !errors.As(err, &re) {
					t.Fatalf("error of an in-memory input: %v", err)
				}
				break
			}
			recs = append(recs, rec)
			if err := rw.Put(rec); err != nil {
				t.Fatal(err)
			}
		}
		rw.Flush()
		if !text && !bytes.Equal(out.Bytes(), in[:rr.Offset()]) {
			t.Fatalf("binary records written back differ from the %d bytes read", rr.Offset())
		}
		back := NewReader(&out, text, 0, 0)
		for i, want := range recs {
			got, err := back.Next()
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("record %d: %q, %v; want %q", i+1, got, err, want)
			}
		}
		if _, err := back.Next(); err != io.EOF || back.Offset() != rw.Written() {
			t.Fatalf("end: %v at %d of %d", err, back.Offset(), rw.Written())
		}
	})
}

func TestWriterRefusesOversizedRecord(t *testing.T) {
	rw := NewWriter(io.Discard, false, 0)
	if err := rw.Put(make([]byte, MaxRecord+1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("%v, want ErrTooLarge", err)
	}
}
