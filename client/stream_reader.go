package client

import (
	"crypto/cipher"
	"errors"
	"fmt"
	"io"
)

// streamReader opens chunks in place in one buffer of chunk+32 bytes: a
// chunk's ciphertext and up to 16 bytes of the next, which show that the
// chunk is not the final one.
//
// buf[:n] holds what was read from src and not yet opened, except that
// after an in-place open buf[:len(pt)] holds the plaintext pt of the chunk
// that ended at buf[off], and buf[off:n] the bytes after it.
type streamReader struct {
	src   io.Reader
	aead  cipher.AEAD
	nonce streamNonce
	index uint64 // the next chunk's
	enc   int    // a full chunk's ciphertext size: chunk+16
	buf   []byte
	n     int
	off   int
	pt    []byte
	eof   bool  // src is at its end
	err   error // sticky; io.EOF after the final chunk
}

func newStreamReader(src io.Reader, h streamHeader, fileKey *[streamKeySize]byte) (*streamReader, error) {
	aead, err := streamAEAD(fileKey, h.raw)
	if err != nil {
		return nil, err
	}
	enc := h.chunk + streamTagSize
	r := &streamReader{src: src, aead: aead, enc: enc, buf: make([]byte, enc+streamTagSize)}
	copy(r.nonce[:], h.prefix[:])
	return r, nil
}

// Read returns authenticated plaintext; see [Client.NewDecryptReader].
func (r *streamReader) Read(p []byte) (int, error) {
	if len(r.pt) == 0 && r.err == nil && len(p) > 0 {
		if k, err := r.next(p); k > 0 || err != nil {
			return k, err // opened into p directly
		}
	}
	if len(r.pt) > 0 {
		k := copy(p, r.pt)
		r.consume(k)
		return k, nil
	}
	if r.err != nil {
		return 0, r.err
	}
	return 0, nil
}

// WriteTo writes all the authenticated plaintext to w (io.Copy uses it)
// straight from the chunk buffer. It returns nil at the end of a good
// file, and the error otherwise.
func (r *streamReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if len(r.pt) == 0 && r.err == nil {
			r.next(nil)
		}
		if len(r.pt) > 0 {
			k, err := w.Write(r.pt)
			if k < 0 || k > len(r.pt) {
				return total, errors.New("hsmd client: invalid write result")
			}
			total += int64(k)
			r.consume(k)
			if err == nil && len(r.pt) > 0 {
				err = io.ErrShortWrite
			}
			if err != nil {
				return total, err
			}
			continue
		}
		if r.err == io.EOF {
			return total, nil
		}
		return total, r.err
	}
}

// consume marks k plaintext bytes as delivered; once all are, it moves the
// bytes read past the opened chunk to the buffer's front (the next read
// overwrites the plaintext). After the final chunk it clears the buffer.
func (r *streamReader) consume(k int) {
	r.pt = r.pt[k:]
	if len(r.pt) > 0 {
		return
	}
	if r.err == io.EOF {
		clear(r.buf)
		return
	}
	if r.off > 0 {
		r.n = copy(r.buf, r.buf[r.off:r.n])
		r.off = 0
	}
}

// next reads and opens the next chunk: into p if p can hold its
// plaintext (and returns its length), else in place into r.pt. It sets
// r.err on failure, and to io.EOF after the final chunk.
func (r *streamReader) next(p []byte) (int, error) {
	if err := r.fill(); err != nil {
		r.fail(err)
		return 0, r.err
	}
	last := r.n <= r.enc // the file ends within this chunk
	size := min(r.n, r.enc)
	if size < streamTagSize || (last && size == streamTagSize && r.index > 0) || r.index >= streamMaxChunks {
		r.fail(ErrDecrypt)
		return 0, r.err
	}
	nonce := r.nonce.set(r.index, last)
	if plen := size - streamTagSize; plen > 0 && len(p) >= plen {
		out, err := r.aead.Open(p[:0], nonce, r.buf[:size], nil)
		if err != nil {
			clear(p[:plen])
			r.fail(ErrDecrypt)
			return 0, r.err
		}
		r.advance(last)
		r.n = copy(r.buf, r.buf[size:r.n])
		return len(out), nil
	}
	out, err := r.aead.Open(r.buf[:0], nonce, r.buf[:size], nil)
	if err != nil {
		r.fail(ErrDecrypt)
		return 0, r.err
	}
	r.advance(last)
	r.pt, r.off = out, size
	return 0, nil
}

func (r *streamReader) advance(last bool) {
	r.index++
	if last {
		r.err = io.EOF
	}
}

// fill reads until the buffer holds more than a full chunk or src ends.
func (r *streamReader) fill() error {
	for r.n <= r.enc && !r.eof {
		m, err := r.src.Read(r.buf[r.n:])
		r.n += m
		switch {
		case err == io.EOF:
			r.eof = true
		case err != nil:
			return fmt.Errorf("hsmd client: reading stream: %w", err)
		}
	}
	return nil
}

func (r *streamReader) fail(err error) {
	r.err = err
	r.pt = nil
	clear(r.buf)
}
