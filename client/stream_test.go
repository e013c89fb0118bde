package client

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"testing/iotest"

	"github.com/hsmd/hsmd/server"
)

const streamVectorDir = "../testdata/vectors/stream"

// startStreamServer starts hsmd in process (startReal: a fresh SoftHSM
// token, tenants "alpha" and "beta") and returns a client of it.
func startStreamServer(t testing.TB) *Client {
	t.Helper()
	return startReal(t, server.Limits{}).dial(t)
}

// encryptStream encrypts pt for tenant alpha with opts, writing it in
// pieces of step bytes (0: through io.Copy, which uses ReadFrom).
func encryptStream(t testing.TB, c *Client, pt []byte, opts StreamOptions, step int) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := c.NewEncryptWriter(t.Context(), "alpha", &out, opts)
	if err != nil {
		t.Fatal(err)
	}
	if step == 0 {
		if _, err := io.Copy(w, iotest.HalfReader(bytes.NewReader(pt))); err != nil {
			t.Fatal(err)
		}
	} else {
		for p := pt; len(p) > 0; {
			k := min(step, len(p))
			if n, err := w.Write(p[:k]); n != k || err != nil {
				t.Fatalf("Write: %d, %v", n, err)
			}
			p = p[k:]
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// readStream reads r to its end with reads of step bytes (0: io.Copy,
// which uses WriteTo) and returns what it released and the final error
// (nil at a good end).
func readStream(r io.Reader, step int) ([]byte, error) {
	var out bytes.Buffer
	if step == 0 {
		_, err := io.Copy(&out, r)
		return out.Bytes(), err
	}
	p := make([]byte, step)
	for {
		n, err := r.Read(p)
		out.Write(p[:n])
		if err == io.EOF {
			return out.Bytes(), nil
		}
		if err != nil {
			return out.Bytes(), err
		}
	}
}

// decryptStream opens a stream through hsmd and reads it all.
func decryptStream(c *Client, tenant string, ct []byte, opts StreamOptions, step int) ([]byte, error) {
	r, err := c.NewDecryptReader(context.Background(), tenant, bytes.NewReader(ct), opts)
	if err != nil {
		return nil, err
	}
	return readStream(r, step)
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestStreamRoundTrip encrypts and decrypts through hsmd on SoftHSM at
// the sizes around the chunk boundaries, with every way of writing and
// reading, and checks the file's length.
func TestStreamRoundTrip(t *testing.T) {
	c := startStreamServer(t)
	ctx := map[string]string{"bucket": "b1", "object": "o/1"}
	for _, chunk := range []int{MinChunkSize, 1000, DefaultChunkSize} {
		for _, size := range []int{0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 5*chunk + 7} {
			pt := randomBytes(t, size)
			for _, wstep := range []int{0, 1 + size/3, chunk, 3*chunk + 1} {
				name := fmt.Sprintf("chunk=%d/size=%d/write=%d", chunk, size, wstep)
				t.Run(name, func(t *testing.T) {
					opts := StreamOptions{Context: ctx, ChunkSize: chunk}
					if chunk == DefaultChunkSize {
						opts.ChunkSize = 0
					}
					ct := encryptStream(t, c, pt, opts, wstep)
					chunks := max(1, (size+chunk-1)/chunk)
					if want := streamFixedHeader + 90 + size + chunks*streamTagSize; len(ct) != want {
						t.Fatalf("file is %d bytes, want %d", len(ct), want)
					}
					for _, rstep := range []int{0, 1 + chunk/2, chunk, 4 * chunk} {
						got, err := decryptStream(c, "alpha", ct, StreamOptions{Context: ctx}, rstep)
						if err != nil || !bytes.Equal(got, pt) {
							t.Fatalf("read step %d: %d bytes, %v", rstep, len(got), err)
						}
					}
				})
			}
		}
	}
}

// TestStreamWrongTenantOrContext: the wrapped key is an ordinary hsmd
// ciphertext, bound to its tenant and context.
func TestStreamWrongTenantOrContext(t *testing.T) {
	c := startStreamServer(t)
	pt := randomBytes(t, 3000)
	ct := encryptStream(t, c, pt, StreamOptions{Context: map[string]string{"k": "v"}, ChunkSize: 1000}, 0)
	for _, tt := range []struct {
		tenant string
		ctx    map[string]string
	}{
		{"beta", map[string]string{"k": "v"}},
		{"alpha", map[string]string{"k": "w"}},
		{"alpha", nil},
		{"alpha", map[string]string{"k": "v", "x": ""}},
	} {
		got, err := decryptStream(c, tt.tenant, ct, StreamOptions{Context: tt.ctx}, 0)
		if err != ErrDecrypt || len(got) != 0 {
			t.Errorf("tenant %q context %v: %d bytes, %v; want exactly ErrDecrypt", tt.tenant, tt.ctx, len(got), err)
		}
	}
	if got, err := decryptStream(c, "", ct, StreamOptions{Context: map[string]string{"k": "v"}}, 0); err != nil || !bytes.Equal(got, pt) {
		t.Errorf("without a tenant: %v", err)
	}
}

// streamFile is an encrypted file cut into its header and chunks.
type streamFile struct {
	header []byte
	chunks [][]byte
}

func splitStream(ct []byte, chunk int) streamFile {
	hl := streamFixedHeader + int(binary.BigEndian.Uint16(ct[20:22]))
	f := streamFile{header: ct[:hl]}
	for body := ct[hl:]; len(body) > 0; {
		k := min(len(body), chunk+streamTagSize)
		f.chunks = append(f.chunks, body[:k])
		body = body[k:]
	}
	return f
}

func (f streamFile) join(idx ...int) []byte {
	out := bytes.Clone(f.header)
	for _, i := range idx {
		out = append(out, f.chunks[i]...)
	}
	return out
}

// TestStreamTampering damages a real file in every way the format must
// catch. Each fails with exactly ErrDecrypt (or, for a header that does not
// parse, ErrMalformed), after releasing exactly the plaintext of the
// chunks before the damage, with every way of reading.
func TestStreamTampering(t *testing.T) {
	c := startStreamServer(t)
	const chunk = 100
	pt := randomBytes(t, 5*chunk+37) // chunks 0..5, the final one 37 bytes
	opts := StreamOptions{Context: map[string]string{"f": "1"}, ChunkSize: chunk}
	ct := encryptStream(t, c, pt, opts, 0)
	f := splitStream(ct, chunk)
	if len(f.chunks) != 6 {
		t.Fatalf("%d chunks", len(f.chunks))
	}
	hl, enc := len(f.header), chunk+streamTagSize

	type tamper struct {
		name     string
		file     []byte
		released int // plaintext bytes released before the error
	}
	cases := []tamper{
		{"reorder 0 1", f.join(1, 0, 2, 3, 4, 5), 0},
		{"reorder 3 4", f.join(0, 1, 2, 4, 3, 5), 3 * chunk},
		{"reorder final", f.join(0, 1, 2, 3, 5, 4), 4 * chunk},
		{"duplicate 0", f.join(0, 0, 1, 2, 3, 4, 5), chunk},
		{"duplicate 2", f.join(0, 1, 2, 2, 3, 4, 5), 3 * chunk},
		{"duplicate final", f.join(0, 1, 2, 3, 4, 5, 5), 5 * chunk},
		{"drop 2", f.join(0, 1, 3, 4, 5), 2 * chunk},
		{"drop final", f.join(0, 1, 2, 3, 4), 4 * chunk},
		{"drop all", f.join(), 0},
		{"append byte", append(bytes.Clone(ct), 0), 5 * chunk},
		{"append chunk-sized", append(bytes.Clone(ct), make([]byte, enc)...), 5 * chunk},
		{"append header", append(bytes.Clone(ct), f.header...), 5 * chunk},
		{"append file", append(bytes.Clone(ct), ct...), 5 * chunk},
	}
	// Every truncation of the body.
	for n := hl; n < len(ct); n++ {
		k := (n - hl) / enc
		if (n-hl)%enc == 0 {
			k-- // the last whole chunk now ends the file, but is not final
		}
		cases = append(cases, tamper{fmt.Sprintf("truncate to %d", n), ct[:n], max(0, k) * chunk})
	}
	// A bit of every body byte.
	for i := hl; i < len(ct); i++ {
		b := bytes.Clone(ct)
		b[i] ^= 1 << (i % 8)
		cases = append(cases, tamper{fmt.Sprintf("flip body byte %d", i), b, (i - hl) / enc * chunk})
	}
	for _, tc := range cases {
		for _, step := range []int{0, 7, chunk, 10 * chunk} {
			got, err := decryptStream(c, "alpha", tc.file, opts, step)
			if err != ErrDecrypt {
				t.Errorf("%s, read step %d: error %v, want exactly ErrDecrypt", tc.name, step, err)
			}
			if !bytes.Equal(got, pt[:tc.released]) {
				t.Errorf("%s, read step %d: released %d bytes, want the first %d", tc.name, step, len(got), tc.released)
			}
		}
	}
	// A bit of every header byte: nothing is released. Bytes the reader
	// parses may make it malformed; any other change is ErrDecrypt.
	for i := 0; i < hl; i++ {
		for _, mask := range []byte{0x01, 0x80} {
			b := bytes.Clone(ct)
			b[i] ^= mask
			got, err := decryptStream(c, "alpha", b, opts, 0)
			switch {
			case len(got) != 0:
				t.Errorf("header byte %d ^ %#x: released %d bytes", i, mask, len(got))
			case err == ErrDecrypt:
			case errors.Is(err, ErrMalformed) && (i < 13 || i == 20 || i == 21 || i == 22 || i == 23):
				// magic, version, chunk size out of bounds, wrapped length,
				// or the wrapped key's own version and suite bytes (hsmd
				// says MALFORMED)
			default:
				t.Errorf("header byte %d ^ %#x: %v", i, mask, err)
			}
		}
	}
}

// TestStreamNoUnauthenticatedOutput: a chunk that fails leaves no
// plaintext in the caller's buffer, whether it was opened into it or in
// the reader's own buffer.
func TestStreamNoUnauthenticatedOutput(t *testing.T) {
	var key [streamKeySize]byte
	rand.Read(key[:])
	const chunk = 256
	pt := bytes.Repeat([]byte("secret!!"), chunk/8)
	var out bytes.Buffer
	w, err := newStreamWriter(&out, &key, [7]byte{}, []byte{1}, chunk)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(pt)
	w.Close()
	file := out.Bytes()
	file[len(file)-1] ^= 1 // the tag of the one chunk
	for _, size := range []int{chunk, 4 * chunk, 10} {
		h, err := readStreamHeader(bytes.NewReader(file))
		if err != nil {
			t.Fatal(err)
		}
		r, err := newStreamReader(bytes.NewReader(file[len(h.raw):]), h, &key)
		if err != nil {
			t.Fatal(err)
		}
		p := bytes.Repeat([]byte{0xaa}, size)
		n, err := r.Read(p)
		if n != 0 || err != ErrDecrypt {
			t.Fatalf("Read(%d): %d, %v", size, n, err)
		}
		if bytes.Contains(p, []byte("secret")) {
			t.Fatalf("Read(%d) left plaintext in the caller's buffer", size)
		}
		if bytes.Contains(r.buf, []byte("secret")) {
			t.Fatalf("Read(%d) left plaintext in the reader's buffer", size)
		}
		if n, err := r.Read(p); n != 0 || err != ErrDecrypt {
			t.Fatalf("the error is not sticky: %d, %v", n, err)
		}
	}
}

// TestStreamLimitsBeforeAllocation: headers over the limits are refused
// after reading the fixed header alone, with no RPC (the client's server
// does not exist) and no allocation of their size.
func TestStreamLimitsBeforeAllocation(t *testing.T) {
	c, err := Dial(t.Context(), "unix://"+filepath.Join(t.TempDir(), "none.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hdr := func(chunk uint32, wrapped uint16) []byte {
		b := append(streamMagic[:], streamVersion)
		b = binary.BigEndian.AppendUint32(b, chunk)
		b = append(b, make([]byte, streamPrefixSize)...)
		return binary.BigEndian.AppendUint16(b, wrapped)
	}
	for _, tt := range []struct {
		name string
		h    []byte
	}{
		{"4 GiB chunk", hdr(0xffffffff, 90)},
		{"chunk over max", hdr(MaxChunkSize+1, 90)},
		{"chunk under min", hdr(MinChunkSize-1, 90)},
		{"zero chunk", hdr(0, 90)},
		{"64 KiB wrapped key", hdr(DefaultChunkSize, 0xffff)},
		{"no wrapped key", hdr(DefaultChunkSize, 0)},
	} {
		// The source never ends: reading past the header would hang.
		src := io.MultiReader(bytes.NewReader(tt.h), zeroReader{})
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		r, err := c.NewDecryptReader(t.Context(), "alpha", src, StreamOptions{})
		runtime.ReadMemStats(&after)
		if r != nil || !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", tt.name, err)
		}
		if d := after.TotalAlloc - before.TotalAlloc; d > 16<<10 {
			t.Errorf("%s: allocated %d bytes before refusing", tt.name, d)
		}
	}
	// The writer refuses a bad chunk size before any RPC.
	for _, n := range []int{-1, MinChunkSize - 1, MaxChunkSize + 1} {
		if _, err := c.NewEncryptWriter(t.Context(), "alpha", io.Discard, StreamOptions{ChunkSize: n}); err == nil || !bytes.Contains([]byte(err.Error()), []byte("chunk size")) {
			t.Errorf("ChunkSize %d: %v", n, err)
		}
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// TestStreamWriterContract: Close is safe twice, writes after it fail, a
// destination error is sticky, and the writer never closes its
// destination.
func TestStreamWriterContract(t *testing.T) {
	var key [streamKeySize]byte
	var out bytes.Buffer
	w, err := newStreamWriter(&out, &key, [7]byte{}, []byte{1}, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if n, err := w.Write([]byte("x")); n != 0 || err != errStreamClosed {
		t.Fatalf("Write after Close: %d, %v", n, err)
	}
	if _, err := w.ReadFrom(bytes.NewReader([]byte("x"))); err != errStreamClosed {
		t.Fatalf("ReadFrom after Close: %v", err)
	}

	bad := errors.New("disk full")
	fw := &failWriter{after: 1, err: bad} // the header goes through, the first chunk does not
	w, err = newStreamWriter(fw, &key, [7]byte{}, []byte{1}, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(make([]byte, 3*MinChunkSize)); !errors.Is(err, bad) {
		t.Fatalf("Write: %v", err)
	}
	if _, err := w.Write([]byte("x")); !errors.Is(err, bad) {
		t.Fatalf("second Write: %v", err)
	}
	if err := w.Close(); !errors.Is(err, bad) {
		t.Fatalf("Close: %v", err)
	}

	short := &failWriter{after: 1, short: true}
	w, _ = newStreamWriter(short, &key, [7]byte{}, []byte{1}, MinChunkSize)
	if err := w.Close(); !errors.Is(err, io.ErrShortWrite) {
		t.Fatalf("short write: %v", err)
	}
}

// failWriter accepts after writes, then fails with err (or writes short).
type failWriter struct {
	after int
	err   error
	short bool
}

func (f *failWriter) Write(p []byte) (int, error) {
	if f.after > 0 {
		f.after--
		return len(p), nil
	}
	if f.short {
		return len(p) / 2, nil
	}
	return 0, f.err
}

// TestStreamChunkLimit: index 2^32 is never used, by writers or readers.
func TestStreamChunkLimit(t *testing.T) {
	var key [streamKeySize]byte
	w, err := newStreamWriter(io.Discard, &key, [7]byte{}, []byte{1}, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	w.index = streamMaxChunks - 1
	if _, err := w.Write(make([]byte, MinChunkSize+1)); err != nil {
		t.Fatal(err) // chunk 2^32-1 is sealed as not final
	}
	if err := w.Close(); err != errStreamTooLong {
		t.Fatalf("Close: %v, want errStreamTooLong", err)
	}

	var out bytes.Buffer
	w, _ = newStreamWriter(&out, &key, [7]byte{}, []byte{1}, MinChunkSize)
	w.Close()
	h, _ := readStreamHeader(&out)
	r, _ := newStreamReader(&out, h, &key)
	r.index = streamMaxChunks
	if _, err := r.Read(make([]byte, 10)); err != ErrDecrypt {
		t.Fatalf("Read: %v", err)
	}
}

// TestStreamZeroAllocsPerChunk: sealing and opening a chunk allocate
// nothing, with every way of writing and reading.
func TestStreamZeroAllocsPerChunk(t *testing.T) {
	var key [streamKeySize]byte
	const chunk = 4096
	pt := make([]byte, 3*chunk)
	w, _ := newStreamWriter(io.Discard, &key, [7]byte{}, []byte{1}, chunk)
	if a := testing.AllocsPerRun(100, func() { w.Write(pt) }); a != 0 {
		t.Errorf("Write: %v allocations per 3 chunks", a)
	}
	src := bytes.NewReader(pt)
	if a := testing.AllocsPerRun(100, func() { src.Reset(pt); w.ReadFrom(src) }); a != 0 {
		t.Errorf("ReadFrom: %v allocations per 3 chunks", a)
	}

	var file bytes.Buffer
	w, _ = newStreamWriter(&file, &key, [7]byte{}, []byte{1}, chunk)
	for range 200 {
		w.Write(pt)
	}
	w.Close()
	h, _ := readStreamHeader(bytes.NewReader(file.Bytes()))
	body := bytes.NewReader(file.Bytes()[len(h.raw):])
	r, _ := newStreamReader(body, h, &key)
	small, big := make([]byte, 1000), make([]byte, 2*chunk)
	stop := &stopWriter{}
	for _, tt := range []struct {
		name string
		f    func()
	}{
		{"Read small", func() { r.Read(small) }},
		{"Read big", func() { r.Read(big) }},
		{"WriteTo", func() { stop.left = 3 * chunk; r.WriteTo(stop) }},
	} {
		if a := testing.AllocsPerRun(100, tt.f); a != 0 {
			t.Errorf("%s: %v allocations", tt.name, a)
		}
	}
	if _, err := r.Read(small); err != nil {
		t.Fatalf("the file ended early: %v", err)
	}
}

var errStop = errors.New("stop")

// stopWriter discards left bytes, then fails.
type stopWriter struct{ left int }

func (w *stopWriter) Write(p []byte) (int, error) {
	if len(p) > w.left {
		n := w.left
		w.left = 0
		return n, errStop
	}
	w.left -= len(p)
	return len(p), nil
}

// TestStreamMemoryFlat: the allocations of encrypting and decrypting a
// stream do not grow with its size.
func TestStreamMemoryFlat(t *testing.T) {
	var key [streamKeySize]byte
	allocs := func(size int64) uint64 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		if err := streamPipeline(&key, size, DefaultChunkSize, nil); err != nil {
			t.Fatal(err)
		}
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc
	}
	allocs(1 << 20) // warm up
	small, large := allocs(1<<20), allocs(64<<20)
	t.Logf("allocated: %d bytes for 1 MiB, %d bytes for 64 MiB", small, large)
	if large > small+64<<10 {
		t.Errorf("64 MiB allocated %d bytes, 1 MiB %d: memory grows with size", large, small)
	}
}

// streamVector is one file of testdata/vectors/stream (written by its
// gen.go).
type streamVector struct {
	Name        string    `json:"name"`
	Class       string    `json:"class"`
	ChunkSize   int       `json:"chunk_size"`
	FileKey     streamHex `json:"file_key"`
	NoncePrefix streamHex `json:"nonce_prefix"`
	WrappedKey  streamHex `json:"wrapped_key"`
	Subkey      streamHex `json:"subkey"`
	Plaintext   streamHex `json:"plaintext"`
	Stream      streamHex `json:"stream"`
}

type streamHex []byte

func (b *streamHex) UnmarshalJSON(in []byte) error {
	var s string
	if err := json.Unmarshal(in, &s); err != nil {
		return err
	}
	d, err := hex.DecodeString(s)
	*b = d
	return err
}

func loadStreamVectors(t *testing.T) []streamVector {
	files, err := filepath.Glob(filepath.Join(streamVectorDir, "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no vectors under %s: %v", streamVectorDir, err)
	}
	var vs []streamVector
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var v streamVector
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		vs = append(vs, v)
	}
	return vs
}

// TestStreamVectors checks the known-answer vectors: the wrapped key is
// opaque (hsmd is replaced by the vector's file key), success vectors open
// and are reproduced byte for byte by the writer, auth failures release
// exactly the given prefix then fail with ErrDecrypt, malformed ones fail
// at the header.
func TestStreamVectors(t *testing.T) {
	classes := map[string]int{}
	for _, v := range loadStreamVectors(t) {
		classes[v.Class]++
		t.Run(v.Name, func(t *testing.T) {
			key := (*[streamKeySize]byte)(v.FileKey)
			h, err := readStreamHeader(bytes.NewReader(v.Stream))
			if v.Class == "malformed" {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("header: %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, step := range []int{0, 1, 33, 1 << 20} {
				r, err := newStreamReader(bytes.NewReader(v.Stream[len(h.raw):]), h, key)
				if err != nil {
					t.Fatal(err)
				}
				got, err := readStream(r, step)
				switch v.Class {
				case "success":
					if err != nil || !bytes.Equal(got, v.Plaintext) {
						t.Fatalf("step %d: %v", step, err)
					}
				case "auth failure":
					if err != ErrDecrypt || !bytes.Equal(got, v.Plaintext) {
						t.Fatalf("step %d: released %d bytes (want %d), %v (want ErrDecrypt)", step, len(got), len(v.Plaintext), err)
					}
				default:
					t.Fatalf("unknown class %q", v.Class)
				}
			}
			if v.Class == "success" {
				checkStreamVectorWrite(t, &v, h)
			}
		})
	}
	for _, c := range []string{"success", "auth failure", "malformed"} {
		if classes[c] == 0 {
			t.Errorf("no %q vectors", c)
		}
	}
}

// checkStreamVectorWrite writes the vector's plaintext with its file key,
// nonce prefix and wrapped key, and checks the bytes and the subkey.
func checkStreamVectorWrite(t *testing.T, v *streamVector, h streamHeader) {
	if h.chunk != v.ChunkSize || !bytes.Equal(h.prefix[:], v.NoncePrefix) || !bytes.Equal(h.wrapped, v.WrappedKey) {
		t.Fatalf("header fields differ from the vector's")
	}
	info := append(append([]byte(streamLabel), 0), h.raw...)
	if sk, _ := hkdf.Key(sha256.New, v.FileKey, nil, string(info), 32); !bytes.Equal(sk, v.Subkey) {
		t.Fatalf("subkey %x, want %x", sk, v.Subkey)
	}
	var out bytes.Buffer
	w, err := newStreamWriter(&out, (*[streamKeySize]byte)(v.FileKey), [7]byte(v.NoncePrefix), v.WrappedKey, v.ChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(v.Plaintext)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), v.Stream) {
		t.Fatalf("rewritten\n %x\nwant\n %x", out.Bytes(), v.Stream)
	}
}
