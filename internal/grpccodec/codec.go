// Package grpccodec is the gRPC codec of hsmd's servers and Go clients:
// the proto codec, with two differences that matter for batches of
// thousands of items.
//
//   - Batch messages (Encrypt and Decrypt requests and responses) are read
//     into one buffer, and their items' bytes alias it, their item
//     structs allocated together: two allocations and one copy per message
//     instead of two allocations and a copy per item. A caller that keeps
//     one item's bytes keeps the whole message's buffer alive.
//   - Messages are marshalled into buffers from a pool that does not clear
//     them (internal/bufpool): each is written whole before it is sent.
//
// Every other message, and any batch message not in the plain form hsmd
// sends (unknown fields, for one), goes through proto.Unmarshal as usual.
package grpccodec

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/internal/bufpool"
)

// Codec is the codec; its zero value is ready to use.
type Codec struct{}

var _ encoding.CodecV2 = Codec{}

// Name is "proto": the codec speaks the same wire format.
func (Codec) Name() string { return grpcproto.Name }

// Marshal encodes v, which must be a proto.Message.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("grpccodec: cannot marshal %T: not a proto.Message", v)
	}
	if r, ok := m.(*hsmdv1.EncryptResponse); ok {
		if w := wireOf(r); w != nil {
			return w, nil
		}
	}
	// Size first: UseCachedSize below relies on it (as grpc's codec does).
	n := proto.Size(m)
	opts := proto.MarshalOptions{UseCachedSize: true}
	if mem.IsBelowBufferPoolingThreshold(n) {
		b, err := opts.Marshal(m)
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	pool := bufpool.Shared
	buf := pool.Get(n)
	if _, err := opts.MarshalAppend((*buf)[:0], m); err != nil {
		pool.Put(buf)
		return nil, err
	}
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}, nil
}

// Unmarshal decodes data into v, which must be a proto.Message.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("grpccodec: cannot unmarshal into %T: not a proto.Message", v)
	}
	var fast func([]byte) bool
	switch m := m.(type) {
	case *hsmdv1.EncryptRequest:
		fast = func(b []byte) bool { return EncryptRequest(b, m) }
	case *hsmdv1.DecryptRequest:
		fast = func(b []byte) bool { return DecryptRequest(b, m) }
	case *hsmdv1.EncryptResponse:
		fast = func(b []byte) bool { return EncryptResponse(b, m) }
	case *hsmdv1.DecryptResponse:
		fast = func(b []byte) bool { return DecryptResponse(b, m) }
	default:
		buf := data.MaterializeToBuffer(bufpool.Shared)
		defer buf.Free()
		return proto.Unmarshal(buf.ReadOnlyData(), m)
	}
	// The items alias b, so b is the message's own (not pooled) memory.
	b := data.Materialize()
	if fast(b) {
		return nil
	}
	return proto.Unmarshal(b, m)
}
