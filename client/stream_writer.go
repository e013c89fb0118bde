package client

import (
	"crypto/cipher"
	"fmt"
	"io"
)

// streamWriter seals chunks in place in one buffer of chunk+16 bytes.
//
// buf[:n] is pending plaintext. After ReadFrom, n may exceed chunk by up
// to 16 bytes (a read into the tag's room): those bytes show that the
// chunk in front of them is not the final one.
type streamWriter struct {
	dst    io.Writer
	aead   cipher.AEAD
	nonce  streamNonce
	index  uint64 // the next chunk's
	chunk  int
	buf    []byte
	n      int
	closed bool
	err    error // sticky
}

// newStreamWriter writes the header and returns the writer of the chunks.
func newStreamWriter(dst io.Writer, fileKey *[streamKeySize]byte, prefix [streamPrefixSize]byte, wrapped []byte, chunk int) (*streamWriter, error) {
	if len(wrapped) < 1 || len(wrapped) > streamMaxWrapped {
		return nil, fmt.Errorf("hsmd client: server returned a wrapped key of %d bytes", len(wrapped))
	}
	header := appendStreamHeader(nil, chunk, prefix, wrapped)
	aead, err := streamAEAD(fileKey, header)
	if err != nil {
		return nil, err
	}
	w := &streamWriter{dst: dst, aead: aead, chunk: chunk, buf: make([]byte, chunk+streamTagSize)}
	copy(w.nonce[:], prefix[:])
	if err := w.write(header); err != nil {
		return nil, err
	}
	return w, nil
}

// Write seals p's bytes as chunks fill. It returns len(p) or an error.
func (w *streamWriter) Write(p []byte) (int, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	total := len(p)
	for len(p) > 0 {
		if w.n >= w.chunk { // more follows: the buffered chunk is not final
			if err := w.sealFull(); err != nil {
				return total - len(p), err
			}
		}
		if w.n == 0 && len(p) > w.chunk { // seal straight from p: no copy
			if err := w.seal(p[:w.chunk], false); err != nil {
				return total - len(p), err
			}
			p = p[w.chunk:]
			continue
		}
		k := copy(w.buf[w.n:w.chunk], p)
		w.n += k
		p = p[k:]
	}
	return total, nil
}

// ReadFrom reads r to its end into the chunk buffer directly (io.Copy
// uses it), sealing chunks as they fill. It does not seal the final chunk:
// Close does. Errors of r are returned as they are.
func (w *streamWriter) ReadFrom(r io.Reader) (int64, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	var total int64
	for {
		if w.n > w.chunk {
			if err := w.sealFull(); err != nil {
				return total, err
			}
		}
		// Read up to 16 bytes past the chunk, into the tag's room: if any
		// arrive, the chunk is not the final one.
		m, err := r.Read(w.buf[w.n:])
		w.n += m
		total += int64(m)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Close seals and writes the final chunk. It does not close the
// destination. Calling it again returns the first call's error.
func (w *streamWriter) Close() error {
	if w.closed || w.err != nil {
		return w.err
	}
	if w.n > w.chunk {
		if err := w.sealFull(); err != nil {
			return err
		}
	}
	err := w.seal(w.buf[:w.n], true)
	w.closed, w.n = true, 0
	clear(w.buf)
	return err
}

func (w *streamWriter) usable() error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return errStreamClosed
	}
	return nil
}

// sealFull seals the chunk at the front of the buffer as not final and
// moves the bytes after it (at most 16) to the front.
func (w *streamWriter) sealFull() error {
	var extra [streamTagSize]byte
	k := copy(extra[:], w.buf[w.chunk:w.n])
	if err := w.seal(w.buf[:w.chunk], false); err != nil {
		return err
	}
	w.n = copy(w.buf, extra[:k])
	clear(extra[:])
	return nil
}

// seal seals pt (the buffer's front, sealed in place, or the caller's
// bytes) into the buffer as the next chunk and writes it.
func (w *streamWriter) seal(pt []byte, last bool) error {
	if w.index >= streamMaxChunks {
		w.fail(errStreamTooLong)
		return w.err
	}
	ct := w.aead.Seal(w.buf[:0], w.nonce.set(w.index, last), pt, nil)
	w.index++
	w.n = 0
	return w.write(ct)
}

func (w *streamWriter) write(b []byte) error {
	n, err := w.dst.Write(b)
	if err == nil && n != len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		w.fail(fmt.Errorf("hsmd client: writing stream: %w", err))
	}
	return w.err
}

func (w *streamWriter) fail(err error) {
	w.err = err
	clear(w.buf)
}
