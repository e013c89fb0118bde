package client

// Streaming encryption of files of any size (docs/FORMAT.md, "Streaming
// files"): a random file key wrapped by hsmd, and the file sealed locally in
// STREAM chunks of AES-256-GCM under a subkey of it.

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Limits of the stream format.
const (
	// DefaultChunkSize is the plaintext size of a chunk when
	// [StreamOptions].ChunkSize is 0: 64 KiB.
	DefaultChunkSize = 64 << 10
	// MinChunkSize and MaxChunkSize bound a chunk's plaintext size, in
	// writers and in the headers readers accept.
	MinChunkSize = 64
	MaxChunkSize = 16 << 20
)

const (
	streamVersion     = 0x01
	streamFixedHeader = 22   // magic, version, chunk_size, nonce_prefix, wrapped_len
	streamMaxWrapped  = 4096 // the most wrapped_len may be
	streamPrefixSize  = 7
	streamTagSize     = 16
	streamKeySize     = 32
	streamMaxChunks   = 1 << 32 // chunk indexes are u32
	streamLabel       = "hsmd/stream/v1/hkdf-sha256/aes-256-gcm"
)

// streamMagic starts every stream file: PNG-style, non-ASCII first.
var streamMagic = [8]byte{0x89, 'H', 'S', 'M', 'D', '\r', '\n', 0x1a}

var (
	errStreamClosed  = errors.New("hsmd client: write to a closed stream writer")
	errStreamTooLong = errors.New("hsmd client: stream is over 2^32 chunks, the most the format holds")
)

// StreamOptions configures [Client.NewEncryptWriter] and
// [Client.NewDecryptReader].
type StreamOptions struct {
	// Context is bound to the wrapped file key as hsmd binds it to any
	// item: decryption needs exactly the same map (nil and empty are the
	// same). It is not stored in the file.
	Context map[string]string
	// ChunkSize is the plaintext size of a chunk, for encryption:
	// [MinChunkSize] to [MaxChunkSize], 0 for [DefaultChunkSize]. The
	// writer and the reader each hold one buffer of about this size.
	// Decryption reads it from the file and ignores this field.
	ChunkSize int
}

// NewEncryptWriter starts an encrypted file: it draws a random file key,
// has hsmd encrypt it under the tenant's current key version with
// opts.Context (one Encrypt RPC, under ctx), and writes the header to dst.
// Plaintext written to the returned writer is sealed in chunks and written
// to dst; memory use is one chunk buffer, whatever the file's size.
//
// The caller must call Close, which seals and writes the final chunk: a
// file whose writer was not closed does not decrypt. Close does not close
// dst. The writer is not safe for concurrent use, and ctx is not used
// after NewEncryptWriter returns. A failure of dst, or a stream over 2^32
// chunks, makes every later call fail with the same error; an error of
// the source read by ReadFrom (io.Copy uses it) is returned as it is and
// leaves the writer usable.
//
// Errors are those of [Client.Encrypt] (gRPC status errors: codes.NotFound
// for an unknown tenant), an "hsmd client: " error for a bad ChunkSize, or
// dst's error.
func (c *Client) NewEncryptWriter(ctx context.Context, tenant string, dst io.Writer, opts StreamOptions) (io.WriteCloser, error) {
	chunk := opts.ChunkSize
	if chunk == 0 {
		chunk = DefaultChunkSize
	}
	if chunk < MinChunkSize || chunk > MaxChunkSize {
		return nil, fmt.Errorf("hsmd client: chunk size %d is outside [%d, %d]", chunk, MinChunkSize, MaxChunkSize)
	}
	var fileKey [streamKeySize]byte
	defer clear(fileKey[:])
	var prefix [streamPrefixSize]byte
	rand.Read(fileKey[:]) // crypto/rand.Read never fails
	rand.Read(prefix[:])
	cts, _, err := c.Encrypt(ctx, tenant, []Item{{Plaintext: fileKey[:], Context: opts.Context}})
	if err != nil {
		return nil, err
	}
	return newStreamWriter(dst, &fileKey, prefix, cts[0], chunk)
}

// NewDecryptReader starts reading an encrypted file from src: it reads
// the header (and no more), has hsmd decrypt the wrapped file key with
// tenant and opts.Context (one Decrypt RPC, under ctx), and returns a
// reader of the plaintext. tenant may be empty (the wrapped key names its
// tenant); when set, a file of another tenant fails. Memory use is one
// chunk buffer, whose size the header gives and which is checked
// ([MaxChunkSize]) before it is allocated.
//
// The reader returns a chunk's plaintext only after the chunk
// authenticated, and io.EOF only after the final chunk did. Its output is
// therefore always a prefix of the plaintext that was written, and it is
// all of it only when reading ends with io.EOF: a file truncated or
// tampered with yields the chunks before the damage and then an error. A
// caller that needs all-or-nothing must not act on the output (nor keep
// it) before that EOF. The reader is not safe for concurrent use; ctx is
// not used after NewDecryptReader returns. An error is returned again by
// every later Read.
//
// Errors, of NewDecryptReader and of Read, are:
//   - [ErrDecrypt], exactly, for any authentication failure: a wrong
//     tenant or context, a changed header or chunk, chunks reordered,
//     duplicated, dropped or appended, a truncated body;
//   - an error wrapping [ErrMalformed] for a file that is not an hsmd
//     stream file: bad magic, an unknown version, a header field out of
//     its bounds, a file shorter than its header, or a wrapped key that is
//     not an hsmd ciphertext;
//   - the other errors of [Client.DecryptOne] for the wrapped key (gRPC
//     status errors, ErrKeyDisabled, ErrKeyDestroyed, ErrKeyRetired);
//   - src's errors, wrapped, other than io.EOF.
func (c *Client) NewDecryptReader(ctx context.Context, tenant string, src io.Reader, opts StreamOptions) (io.Reader, error) {
	h, err := readStreamHeader(src)
	if err != nil {
		return nil, err
	}
	rs, err := c.Decrypt(ctx, tenant, []CiphertextItem{{Ciphertext: h.wrapped, Context: opts.Context}})
	if err != nil {
		return nil, err
	}
	fileKey := rs[0].Plaintext
	defer clear(fileKey)
	if rs[0].Err != nil {
		return nil, rs[0].Err
	}
	if len(fileKey) != streamKeySize {
		return nil, ErrDecrypt
	}
	return newStreamReader(src, h, (*[streamKeySize]byte)(fileKey))
}

// streamHeader is a parsed header.
type streamHeader struct {
	raw     []byte // the whole header, bound into the subkey
	chunk   int
	prefix  [streamPrefixSize]byte
	wrapped []byte // a slice of raw
}

// appendStreamHeader appends the header of a stream to b.
func appendStreamHeader(b []byte, chunk int, prefix [streamPrefixSize]byte, wrapped []byte) []byte {
	b = append(b, streamMagic[:]...)
	b = append(b, streamVersion)
	b = binary.BigEndian.AppendUint32(b, uint32(chunk))
	b = append(b, prefix[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(wrapped)))
	return append(b, wrapped...)
}

// readStreamHeader reads exactly one header from src, checking every
// bound before allocating.
func readStreamHeader(src io.Reader) (streamHeader, error) {
	var fixed [streamFixedHeader]byte
	if err := readHeaderPart(src, fixed[:]); err != nil {
		return streamHeader{}, err
	}
	if [8]byte(fixed[:8]) != streamMagic {
		return streamHeader{}, fmt.Errorf("%w: not an hsmd stream file", ErrMalformed)
	}
	if fixed[8] != streamVersion {
		return streamHeader{}, fmt.Errorf("%w: unknown stream version %d", ErrMalformed, fixed[8])
	}
	chunk := binary.BigEndian.Uint32(fixed[9:13])
	if chunk < MinChunkSize || chunk > MaxChunkSize {
		return streamHeader{}, fmt.Errorf("%w: chunk size %d is outside [%d, %d]", ErrMalformed, chunk, MinChunkSize, MaxChunkSize)
	}
	n := int(binary.BigEndian.Uint16(fixed[20:22]))
	if n < 1 || n > streamMaxWrapped {
		return streamHeader{}, fmt.Errorf("%w: wrapped key length %d is outside [1, %d]", ErrMalformed, n, streamMaxWrapped)
	}
	raw := make([]byte, streamFixedHeader+n)
	copy(raw, fixed[:])
	if err := readHeaderPart(src, raw[streamFixedHeader:]); err != nil {
		return streamHeader{}, err
	}
	h := streamHeader{raw: raw, chunk: int(chunk), wrapped: raw[streamFixedHeader:]}
	copy(h.prefix[:], fixed[13:20])
	return h, nil
}

func readHeaderPart(src io.Reader, b []byte) error {
	_, err := io.ReadFull(src, b)
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		return fmt.Errorf("%w: truncated stream header", ErrMalformed)
	case err != nil:
		return fmt.Errorf("hsmd client: reading stream header: %w", err)
	}
	return nil
}

// streamAEAD derives the subkey from the file key and the header and
// returns its AES-256-GCM.
func streamAEAD(fileKey *[streamKeySize]byte, header []byte) (cipher.AEAD, error) {
	info := make([]byte, 0, len(streamLabel)+1+len(header))
	info = append(append(append(info, streamLabel...), 0), header...)
	subkey, err := hkdf.Key(sha256.New, fileKey[:], nil, string(info), streamKeySize)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: deriving the stream key: %w", err)
	}
	defer clear(subkey)
	block, err := aes.NewCipher(subkey)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: %w", err)
	}
	return cipher.NewGCM(block)
}

// streamNonce is the nonce of one chunk: prefix || u32(index) || u8(last).
type streamNonce [streamPrefixSize + 5]byte

func (n *streamNonce) set(index uint64, last bool) []byte {
	binary.BigEndian.PutUint32(n[streamPrefixSize:], uint32(index))
	n[len(n)-1] = 0
	if last {
		n[len(n)-1] = 1
	}
	return n[:]
}
