// Package ctstream reads and writes files of hsmd ciphertexts, one record
// at a time, in constant memory, in two formats:
//
//   - text: one text-form ciphertext (hsmd:v1:…) a line. Whitespace around
//     a line (a CR of CRLF included) is ignored; a blank line is an error;
//     the last line needs no newline.
//   - binary: each record is a big-endian uint32 length, then that many
//     bytes of binary ciphertext. A length over MaxRecord is refused before
//     anything is allocated for it.
//
// A Reader and a Writer count records and bytes so that a caller can
// resume a stream at a record boundary (seek to Offset, NewReader with
// the counts). Neither is safe for concurrent use.
package ctstream

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/hsmd/hsmd/envelope/wire"
)

const (
	// MaxRecord is the largest binary ciphertext a Reader returns: 8 MiB.
	MaxRecord = 8 << 20
	// MaxLine is the longest text line: the text form (unpadded base64url)
	// of a MaxRecord ciphertext and some whitespace.
	MaxLine = len(wire.TextPrefix) + (MaxRecord*4+2)/3 + 1024
)

// Framing errors, wrapped in a *RecordError. Messages never quote the
// input.
var (
	ErrTooLarge  = errors.New("record is over the 8 MiB limit")
	ErrTruncated = errors.New("truncated record")
	ErrBlankLine = errors.New("blank line")
)

// RecordError is a framing error at one record, numbered from 1 since the
// start of the stream. Unit is "record", or "line" for a blank line (in
// the text format the numbers are the same).
type RecordError struct {
	Unit string
	N    int64
	Err  error
}

func (e *RecordError) Error() string { return fmt.Sprintf("%s %d: %v", e.Unit, e.N, e.Err) }
func (e *RecordError) Unwrap() error { return e.Err }

// Reader reads records.
type Reader struct {
	r    *bufio.Reader
	text bool
	n    int64
	off  int64
}

// NewReader returns a Reader of r, which is positioned after records
// records that took offset bytes (0, 0 at the start of a stream).
func NewReader(r io.Reader, text bool, records, offset int64) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, 1<<16), text: text, n: records, off: offset}
}

// Records is the number of records read, those before NewReader included.
func (rr *Reader) Records() int64 { return rr.n }

// Offset is the number of bytes of the stream those records took.
func (rr *Reader) Offset() int64 { return rr.off }

// Next returns the next record: a line without its surrounding whitespace
// (text), or a ciphertext without its length (binary). It returns io.EOF
// at a clean end, a *RecordError for a framing error, or an I/O error.
// A record is counted only when it is returned whole.
func (rr *Reader) Next() ([]byte, error) {
	if rr.text {
		return rr.nextLine()
	}
	return rr.nextBinary()
}

func (rr *Reader) fail(unit string, err error) error {
	return &RecordError{Unit: unit, N: rr.n + 1, Err: err}
}

func (rr *Reader) nextBinary() ([]byte, error) {
	var hdr [4]byte
	k, err := io.ReadFull(rr.r, hdr[:])
	switch {
	case err == io.EOF:
		return nil, io.EOF
	case err == io.ErrUnexpectedEOF:
		return nil, rr.fail("record", fmt.Errorf("%w: the input ends %d bytes into its 4-byte length", ErrTruncated, k))
	case err != nil:
		return nil, fmt.Errorf("reading input: %w", err)
	}
	l := binary.BigEndian.Uint32(hdr[:])
	if l > MaxRecord {
		return nil, rr.fail("record", fmt.Errorf("%w: its length says %d bytes", ErrTooLarge, l))
	}
	rec := make([]byte, l)
	if k, err := io.ReadFull(rr.r, rec); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, rr.fail("record", fmt.Errorf("%w: the input ends %d bytes into its %d", ErrTruncated, k, l))
		}
		return nil, fmt.Errorf("reading input: %w", err)
	}
	rr.n++
	rr.off += 4 + int64(l)
	return rec, nil
}

func (rr *Reader) nextLine() ([]byte, error) {
	var line []byte
	for {
		frag, err := rr.r.ReadSlice('\n')
		if len(line)+len(frag) > MaxLine {
			return nil, rr.fail("record", fmt.Errorf("%w: its line is over %d bytes", ErrTooLarge, MaxLine))
		}
		line = append(line, frag...)
		if err == bufio.ErrBufferFull {
			continue
		}
		if err == io.EOF && len(line) == 0 {
			return nil, io.EOF
		}
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("reading input: %w", err)
		}
		break
	}
	rec := bytes.TrimSpace(line)
	if len(rec) == 0 {
		return nil, rr.fail("line", ErrBlankLine)
	}
	rr.n++
	rr.off += int64(len(line))
	return rec, nil
}

// Writer writes records. Call Flush at the end (and before syncing the
// file under it).
type Writer struct {
	w    *bufio.Writer
	text bool
	n    int64
}

// NewWriter returns a Writer to w, which already holds written bytes of
// the stream.
func NewWriter(w io.Writer, text bool, written int64) *Writer {
	return &Writer{w: bufio.NewWriterSize(w, 1<<16), text: text, n: written}
}

// Written is the length of the stream: bytes before NewWriter and those
// given to Put since, flushed or not.
func (rw *Writer) Written() int64 { return rw.n }

// Put writes one record: a text form without its newline (text), or a
// binary ciphertext of at most MaxRecord bytes (binary: a longer one, which
// no Reader would read back, is refused with ErrTooLarge).
func (rw *Writer) Put(rec []byte) error {
	if rw.text {
		return rw.write(rec, []byte{'\n'})
	}
	if len(rec) > MaxRecord {
		return fmt.Errorf("ctstream: %w: %d bytes", ErrTooLarge, len(rec))
	}
	return rw.write(binary.BigEndian.AppendUint32(nil, uint32(len(rec))), rec)
}

func (rw *Writer) write(a, b []byte) error {
	for _, p := range [][]byte{a, b} {
		k, err := rw.w.Write(p)
		rw.n += int64(k)
		if err != nil {
			return err
		}
	}
	return nil
}

// Flush writes what is buffered to the underlying writer.
func (rw *Writer) Flush() error { return rw.w.Flush() }
