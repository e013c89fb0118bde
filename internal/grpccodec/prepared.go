package grpccodec

import (
	"sync"
	"unsafe"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/internal/bufpool"
)

// prepared maps a response made by NewEncryptResponse to its wire form.
var prepared = struct {
	sync.Mutex
	m map[*hsmdv1.EncryptResponse]*[]byte
}{m: make(map[*hsmdv1.EncryptResponse]*[]byte)}

// NewEncryptResponse returns an EncryptResponse whose n ciphertexts, of
// size(i) bytes each, are slices of the message's wire form, already
// written but for the ciphertexts themselves: the caller fills each
// Ciphertexts[i] (envelope.Engine.SealInto) and the codec sends the wire
// form as it is, without encoding or copying them again. The response
// must not be changed otherwise (Marshal checks, and encodes a changed
// one as usual), nor read once sent: gRPC returns the wire form to the
// pool after writing it (hsmd installs no stats handler that would look).
// Pass a response that will not be sent to Release.
func NewEncryptResponse(n int, size func(i int) int, keyVersion uint32) *hsmdv1.EncryptResponse {
	total := protowire.SizeTag(2) + protowire.SizeVarint(uint64(keyVersion))
	for i := range n {
		total += protowire.SizeTag(1) + protowire.SizeBytes(size(i))
	}
	buf := bufpool.Shared.Get(total)
	b := (*buf)[:0]
	r := &hsmdv1.EncryptResponse{Ciphertexts: make([][]byte, n), KeyVersion: keyVersion}
	for i := range n {
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(size(i)))
		r.Ciphertexts[i] = b[len(b) : len(b)+size(i) : len(b)+size(i)]
		b = b[:len(b)+size(i)]
	}
	b = protowire.AppendTag(b, 2, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(keyVersion))
	*buf = b
	if n == 0 {
		bufpool.Shared.Put(buf) // nothing aliases it
		return r
	}
	prepared.Lock()
	prepared.m[r] = buf
	prepared.Unlock()
	return r
}

// Release returns the wire form of a response from NewEncryptResponse that
// will not be sent (an interceptor replaced it) to the pool.
func Release(v any) {
	if r, ok := v.(*hsmdv1.EncryptResponse); ok {
		if buf := take(r); buf != nil {
			bufpool.Shared.Put(buf)
		}
	}
}

func take(r *hsmdv1.EncryptResponse) *[]byte {
	prepared.Lock()
	defer prepared.Unlock()
	buf, ok := prepared.m[r]
	if ok {
		delete(prepared.m, r)
	}
	return buf
}

// wireOf returns the wire form of r if NewEncryptResponse made it and r
// still matches it, else nil (having returned any wire form to the pool).
func wireOf(r *hsmdv1.EncryptResponse) mem.BufferSlice {
	buf := take(r)
	if buf == nil {
		return nil
	}
	b := *buf
	// Walk the wire form: every ciphertext must still be the slice it was
	// made as, and the key version the same.
	i := 0
	ok := fields(b, func(f field) bool {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType && i < len(r.Ciphertexts):
			ct := r.Ciphertexts[i]
			i++
			return len(ct) == len(f.buf) && (len(ct) == 0 || unsafe.SliceData(ct) == unsafe.SliceData(f.buf))
		case f.num == 2 && f.typ == protowire.VarintType:
			return uint32(f.v) == r.KeyVersion && f.v <= 1<<32-1
		}
		return false
	})
	if !ok || i != len(r.Ciphertexts) {
		bufpool.Shared.Put(buf)
		return nil
	}
	return mem.BufferSlice{mem.NewBuffer(buf, bufpool.Shared)}
}

// Pending returns how many responses from NewEncryptResponse have been
// neither sent nor released (calls in flight; it does not grow at rest).
func Pending() int {
	prepared.Lock()
	defer prepared.Unlock()
	return len(prepared.m)
}
