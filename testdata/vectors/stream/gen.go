//go:build ignore

// gen writes the test vectors of docs/FORMAT.md's "Streaming files" under
// testdata/vectors/stream/, one scenario a file. It implements the format
// from the document with the standard library alone, independently of
// package client, whose tests check these files. Every value is derived
// from the scenario's name, so running it again writes the same files; it
// refuses to change an existing file's content (vectors never change).
//
//	go run ./testdata/vectors/stream/gen.go     (from the repository root)
package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"path/filepath"
)

const (
	dir   = "testdata/vectors/stream"
	label = "hsmd/stream/v1/hkdf-sha256/aes-256-gcm"
)

var magic = []byte{0x89, 'H', 'S', 'M', 'D', '\r', '\n', 0x1a}

// hexBytes is a byte string written as hex.
type hexBytes []byte

func (b hexBytes) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(b)) }

// vector is one scenario; client/stream_test.go reads the same fields.
type vector struct {
	Name        string   `json:"name"`
	Class       string   `json:"class"` // "success", "auth failure" or "malformed"
	Comment     string   `json:"comment,omitempty"`
	ChunkSize   int      `json:"chunk_size"`
	FileKey     hexBytes `json:"file_key"`
	NoncePrefix hexBytes `json:"nonce_prefix"`
	WrappedKey  hexBytes `json:"wrapped_key"` // opaque: the reader's hsmd would open it to file_key
	Subkey      hexBytes `json:"subkey"`
	// Plaintext is the whole plaintext (success), or what a reader
	// releases before the error (auth failure: the chunks before the
	// damage), or empty (malformed).
	Plaintext hexBytes `json:"plaintext"`
	Stream    hexBytes `json:"stream"`
}

// det returns n bytes determined by label.
func det(label string, n int) []byte {
	var out []byte
	for i := 0; len(out) < n; i++ {
		h := sha256.Sum256(fmt.Appendf(nil, "hsmd stream test vector %s %d", label, i))
		out = append(out, h[:]...)
	}
	return out[:n]
}

// file is a stream under construction.
type file struct {
	chunk                int
	key, prefix, wrapped []byte
	header, subkey       []byte
	chunks               [][]byte // sealed chunks
	plaintext            []byte
	aead                 cipher.AEAD
}

func newFile(name string, chunk int, plaintext []byte) *file {
	f := &file{chunk: chunk, key: det(name+"/file-key", 32), prefix: det(name+"/nonce-prefix", 7), plaintext: plaintext}
	// A wrapped key shaped like a suite 0x01 hsmd ciphertext of 32 bytes
	// (version 1, suite 1, then 88 bytes): opaque to the format.
	f.wrapped = append([]byte{0x01, 0x01}, det(name+"/wrapped", 88)...)
	f.header = header(chunk, f.prefix, f.wrapped)
	f.derive()
	return f
}

func header(chunk int, prefix, wrapped []byte) []byte {
	h := append([]byte{}, magic...)
	h = append(h, 0x01)
	h = binary.BigEndian.AppendUint32(h, uint32(chunk))
	h = append(h, prefix...)
	h = binary.BigEndian.AppendUint16(h, uint16(len(wrapped)))
	return append(h, wrapped...)
}

func (f *file) derive() {
	info := append(append([]byte(label), 0), f.header...)
	k, err := hkdf.Key(sha256.New, f.key, nil, string(info), 32)
	if err != nil {
		log.Fatal(err)
	}
	f.subkey = k
	block, err := aes.NewCipher(k)
	if err != nil {
		log.Fatal(err)
	}
	if f.aead, err = cipher.NewGCM(block); err != nil {
		log.Fatal(err)
	}
}

func (f *file) seal(i int, pt []byte, last bool) []byte {
	nonce := binary.BigEndian.AppendUint32(append([]byte{}, f.prefix...), uint32(i))
	flag := byte(0)
	if last {
		flag = 1
	}
	return f.aead.Seal(nil, append(nonce, flag), pt, nil)
}

// sealAll seals the plaintext as the format says.
func (f *file) sealAll() *file {
	pt := f.plaintext
	for i := 0; ; i++ {
		if len(pt) <= f.chunk {
			f.chunks = append(f.chunks, f.seal(i, pt, true))
			return f
		}
		f.chunks = append(f.chunks, f.seal(i, pt[:f.chunk], false))
		pt = pt[f.chunk:]
	}
}

func (f *file) bytes() []byte {
	return append(append([]byte{}, f.header...), bytes.Join(f.chunks, nil)...)
}

func (f *file) vector(name, class, comment string, stream, plaintext []byte) vector {
	return vector{Name: name, Class: class, Comment: comment, ChunkSize: f.chunk, FileKey: f.key,
		NoncePrefix: f.prefix, WrappedKey: f.wrapped, Subkey: f.subkey, Plaintext: plaintext, Stream: stream}
}

func success(name, comment string, chunk, n int) vector {
	f := newFile(name, chunk, det(name+"/plaintext", n)).sealAll()
	return f.vector(name, "success", comment, f.bytes(), f.plaintext)
}

func main() {
	var out []vector
	out = append(out,
		success("stream-success-empty", "empty file at the default chunk size: one empty final chunk", 65536, 0),
		success("stream-success-one-chunk", "40 bytes in one final chunk of 64", 64, 40),
		success("stream-success-exact", "two full chunks of 64, the second final", 64, 128),
		success("stream-success-multi", "250 bytes in chunks of 100: 100, 100, 50", 100, 250),
		success("stream-success-default", "1000 bytes at the default chunk size: one short final chunk", 65536, 1000),
	)
	out = append(out, authFailures()...)
	out = append(out, malformed()...)
	write(out)
}

// authFailures damages a three-chunk file (chunk 100: 100, 100, 50) and a
// two-full-chunk file (chunk 64).
func authFailures() []vector {
	const fail = "auth failure"
	multi := func(name string) *file { return newFile(name, 100, det(name+"/plaintext", 250)).sealAll() }
	var vs []vector
	add := func(f *file, name, comment string, stream []byte, released int) {
		vs = append(vs, f.vector(name, fail, comment, stream, f.plaintext[:released]))
	}
	join := func(f *file, chunks ...[]byte) []byte {
		return append(append([]byte{}, f.header...), bytes.Join(chunks, nil)...)
	}

	f := multi("stream-auth-drop-final")
	add(f, "stream-auth-drop-final", "the final chunk removed: chunk 1 now ends the file but was sealed as not final", join(f, f.chunks[0], f.chunks[1]), 100)
	f = multi("stream-auth-header-only")
	add(f, "stream-auth-header-only", "every chunk removed", join(f), 0)
	f = multi("stream-auth-truncated")
	add(f, "stream-auth-truncated", "the last 10 bytes of the final chunk removed", f.bytes()[:len(f.bytes())-10], 200)
	f = multi("stream-auth-reordered")
	add(f, "stream-auth-reordered", "chunks 0 and 1 swapped", join(f, f.chunks[1], f.chunks[0], f.chunks[2]), 0)
	f = multi("stream-auth-duplicated")
	add(f, "stream-auth-duplicated", "chunk 0 twice", join(f, f.chunks[0], f.chunks[0], f.chunks[1], f.chunks[2]), 100)
	f = multi("stream-auth-appended")
	add(f, "stream-auth-appended", "5 bytes after the final chunk", append(f.bytes(), 1, 2, 3, 4, 5), 200)
	f = multi("stream-auth-tag")
	c1 := bytes.Clone(f.chunks[1])
	c1[len(c1)-1] ^= 0x80
	add(f, "stream-auth-tag", "one bit of chunk 1's tag flipped", join(f, f.chunks[0], c1, f.chunks[2]), 100)
	f = multi("stream-auth-body")
	c2 := bytes.Clone(f.chunks[2])
	c2[0] ^= 0x01
	add(f, "stream-auth-body", "one bit of the final chunk's ciphertext flipped", join(f, f.chunks[0], f.chunks[1], c2), 200)

	f = multi("stream-auth-no-final")
	noFinal := join(f, f.chunks[0], f.chunks[1], f.seal(2, f.plaintext[200:], false))
	add(f, "stream-auth-no-final", "sealed with the file key, but no chunk flagged final", noFinal, 200)

	f = newFile("stream-auth-appended-chunk", 64, det("stream-auth-appended-chunk/plaintext", 128)).sealAll()
	add(f, "stream-auth-appended-chunk", "two full chunks, then the final chunk again: it is no longer last", join(f, f.chunks[0], f.chunks[1], f.chunks[1]), 64)
	f = newFile("stream-auth-empty-final", 64, det("stream-auth-empty-final/plaintext", 128))
	f.chunks = [][]byte{f.seal(0, f.plaintext[:64], false), f.seal(1, f.plaintext[64:], false), f.seal(2, nil, true)}
	add(f, "stream-auth-empty-final", "sealed with the file key, but ending with an empty final chunk after data (not the one encoding)", f.bytes(), 128)

	for _, h := range []struct {
		name, comment string
		at            int
		mask          byte
	}{
		{"stream-auth-header-chunk-size", "chunk_size 100 changed to 101 (in bounds): another subkey", 12, 0x01},
		{"stream-auth-header-prefix", "one bit of the nonce prefix flipped: another subkey", 15, 0x10},
		{"stream-auth-header-wrapped", "one bit of the wrapped key flipped (the test's hsmd opens it anyway): another subkey", 60, 0x04},
	} {
		f = multi(h.name)
		s := f.bytes()
		s[h.at] ^= h.mask
		add(f, h.name, h.comment, s, 0)
	}
	return vs
}

func malformed() []vector {
	var vs []vector
	for _, m := range []struct {
		name, comment string
		edit          func(s []byte) []byte
	}{
		{"stream-malformed-magic", "first byte 0x01: a binary ciphertext, not a stream", func(s []byte) []byte { s[0] = 0x01; return s }},
		{"stream-malformed-version", "stream version 2", func(s []byte) []byte { s[8] = 2; return s }},
		{"stream-malformed-chunk-4gib", "chunk_size 2^32-1: refused before allocating", func(s []byte) []byte { copy(s[9:13], []byte{0xff, 0xff, 0xff, 0xff}); return s }},
		{"stream-malformed-chunk-small", "chunk_size 63, under the minimum", func(s []byte) []byte { copy(s[9:13], []byte{0, 0, 0, 63}); return s }},
		{"stream-malformed-chunk-big", "chunk_size 2^24+1, over the maximum", func(s []byte) []byte { copy(s[9:13], []byte{0x01, 0, 0, 0x01}); return s }},
		{"stream-malformed-wrapped-zero", "wrapped_len 0", func(s []byte) []byte { s[20], s[21] = 0, 0; return s }},
		{"stream-malformed-wrapped-big", "wrapped_len 4097: refused before allocating", func(s []byte) []byte { s[20], s[21] = 0x10, 0x01; return s }},
		{"stream-malformed-short-fixed", "cut inside the fixed header", func(s []byte) []byte { return s[:21] }},
		{"stream-malformed-short-wrapped", "cut inside the wrapped key", func(s []byte) []byte { return s[:50] }},
	} {
		f := newFile(m.name, 100, det(m.name+"/plaintext", 150)).sealAll()
		vs = append(vs, f.vector(m.name, "malformed", m.comment, m.edit(f.bytes()), nil))
	}
	return vs
}

func write(vs []vector) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Fatal(err)
	}
	for _, v := range vs {
		if v.Plaintext == nil {
			v.Plaintext = hexBytes{}
		}
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			log.Fatal(err)
		}
		b = append(b, '\n')
		path := filepath.Join(dir, v.Name+".json")
		if old, err := os.ReadFile(path); err == nil && !bytes.Equal(old, b) {
			log.Fatalf("%s exists with other content: vectors never change", path)
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			log.Fatal(err)
		}
	}
	log.Printf("wrote %d vectors to %s", len(vs), dir)
}
