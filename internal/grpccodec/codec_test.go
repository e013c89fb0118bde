package grpccodec

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// seeds are the wire forms of realistic batch messages and of odd ones.
func seeds(t testing.TB) [][]byte {
	msgs := []proto.Message{
		&hsmdv1.EncryptRequest{Tenant: "billing", Items: []*hsmdv1.EncryptItem{
			{Plaintext: []byte("one")}, {Plaintext: []byte{}, Context: map[string]string{"a": "b", "": ""}}, {}}},
		&hsmdv1.DecryptRequest{Tenant: "t", Items: []*hsmdv1.DecryptItem{{Ciphertext: []byte("ct"), Context: map[string]string{"k": "v"}}}},
		&hsmdv1.EncryptResponse{Ciphertexts: [][]byte{[]byte("a"), {}, []byte("ccc")}, KeyVersion: 7},
		&hsmdv1.DecryptResponse{Results: []*hsmdv1.DecryptResult{{Plaintext: []byte("p")},
			{Error: &hsmdv1.ItemError{Code: 3, Reason: "DECRYPT_FAILED", Message: "m"}}, {}}},
	}
	var out [][]byte
	for _, m := range msgs {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	// A repeated scalar (last wins), an unknown field, a wrong wire type,
	// a string that is not UTF-8, a repeated error message (merged).
	out = append(out,
		protowire.AppendTag(protowire.AppendString(protowire.AppendTag(nil, 1, protowire.BytesType), "x"), 1, protowire.BytesType),
		append(bytes.Clone(out[0]), protowire.AppendVarint(protowire.AppendTag(nil, 9, protowire.VarintType), 1)...),
		protowire.AppendVarint(protowire.AppendTag(nil, 2, protowire.VarintType), 5),
		protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte{0xff, 0xfe}),
		bytes.Repeat(out[3][len(out[3])-6:], 2),
		[]byte{0x12, 0x80}, nil,
	)
	return out
}

type kind struct {
	name  string
	new   func() proto.Message
	parse func([]byte, proto.Message) bool
}

var kinds = []kind{
	{"EncryptRequest", func() proto.Message { return new(hsmdv1.EncryptRequest) },
		func(b []byte, m proto.Message) bool { return EncryptRequest(b, m.(*hsmdv1.EncryptRequest)) }},
	{"DecryptRequest", func() proto.Message { return new(hsmdv1.DecryptRequest) },
		func(b []byte, m proto.Message) bool { return DecryptRequest(b, m.(*hsmdv1.DecryptRequest)) }},
	{"EncryptResponse", func() proto.Message { return new(hsmdv1.EncryptResponse) },
		func(b []byte, m proto.Message) bool { return EncryptResponse(b, m.(*hsmdv1.EncryptResponse)) }},
	{"DecryptResponse", func() proto.Message { return new(hsmdv1.DecryptResponse) },
		func(b []byte, m proto.Message) bool { return DecryptResponse(b, m.(*hsmdv1.DecryptResponse)) }},
}

// check parses b both ways: where the fast parser accepts, proto.Unmarshal
// must succeed with the same message; and the codec must agree with
// proto.Unmarshal whatever the input.
func check(t *testing.T, b []byte) (accepted int) {
	for _, k := range kinds {
		want := k.new()
		werr := proto.Unmarshal(b, want)
		got := k.new()
		if k.parse(bytes.Clone(b), got) {
			accepted++
			if werr != nil {
				t.Fatalf("%s: fast parser accepted %x, proto.Unmarshal: %v", k.name, b, werr)
			}
			if !proto.Equal(want, got) {
				t.Fatalf("%s: fast parse of %x = %v, proto.Unmarshal: %v", k.name, b, got, want)
			}
		}
		viaCodec := k.new()
		cerr := Codec{}.Unmarshal(mem.BufferSlice{mem.SliceBuffer(bytes.Clone(b))}, viaCodec)
		if (cerr != nil) != (werr != nil) {
			t.Fatalf("%s: codec error %v, proto.Unmarshal error %v, for %x", k.name, cerr, werr, b)
		}
		if werr == nil {
			if !proto.Equal(want, viaCodec) {
				t.Fatalf("%s: codec result for %x = %v, proto.Unmarshal: %v", k.name, b, viaCodec, want)
			}
		}
	}
	return accepted
}

func TestParseMatchesProto(t *testing.T) {
	accepted := 0
	for _, b := range seeds(t) {
		accepted += check(t, b)
	}
	// The four realistic messages at least take the fast path.
	if accepted < 4 {
		t.Fatalf("the fast parsers accepted %d inputs, want at least the 4 realistic ones", accepted)
	}
}

func FuzzParse(f *testing.F) {
	for _, b := range seeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) { check(t, b) })
}

// TestFastPathAliases: the items of a parsed batch share the message's
// buffer and cannot grow into each other.
func TestFastPathAliases(t *testing.T) {
	b, _ := proto.Marshal(&hsmdv1.EncryptRequest{Tenant: "t", Items: []*hsmdv1.EncryptItem{{Plaintext: []byte("aa")}, {Plaintext: []byte("bb")}}})
	var m hsmdv1.EncryptRequest
	if !EncryptRequest(b, &m) {
		t.Fatal("not parsed")
	}
	p0 := m.Items[0].Plaintext
	if cap(p0) != 2 || &b[len(b)-1] != &m.Items[1].Plaintext[1] {
		t.Fatalf("plaintext 0 has capacity %d; item 1 does not alias the buffer", cap(p0))
	}
	_ = append(p0, 'x')
	if string(m.Items[1].Plaintext) != "bb" {
		t.Fatal("appending to one item changed the next")
	}
}

// TestPreparedResponse: a response made by NewEncryptResponse is sent as
// its wire form, decodes to the same message, and leaves nothing pending;
// a changed one is encoded afresh; a released one is forgotten.
func TestPreparedResponse(t *testing.T) {
	sizes := []int{3, 0, 200}
	r := NewEncryptResponse(len(sizes), func(i int) int { return sizes[i] }, 9)
	for i, ct := range r.Ciphertexts {
		if len(ct) != sizes[i] {
			t.Fatalf("ciphertext %d has %d bytes", i, len(ct))
		}
		for j := range ct {
			ct[j] = byte(i + j)
		}
	}
	want := proto.Clone(r)
	if Pending() != 1 {
		t.Fatalf("Pending = %d", Pending())
	}
	data, err := Codec{}.Marshal(r)
	if err != nil || Pending() != 0 {
		t.Fatalf("Marshal: %v, pending %d", err, Pending())
	}
	var got hsmdv1.EncryptResponse
	if err := proto.Unmarshal(data.Materialize(), &got); err != nil || !proto.Equal(&got, want) {
		t.Fatalf("decoded %v (%v), want %v", &got, err, want)
	}
	data.Free()

	r = NewEncryptResponse(2, func(int) int { return 4 }, 1)
	r.Ciphertexts[1] = []byte("changed")
	data, err = Codec{}.Marshal(r)
	if err != nil || Pending() != 0 {
		t.Fatalf("Marshal of a changed response: %v, pending %d", err, Pending())
	}
	got.Reset()
	if err := proto.Unmarshal(data.Materialize(), &got); err != nil || string(got.Ciphertexts[1]) != "changed" {
		t.Fatalf("changed response decoded as %v (%v)", &got, err)
	}

	r = NewEncryptResponse(1, func(int) int { return 1 }, 1)
	Release(r)
	if Pending() != 0 {
		t.Fatalf("Pending after Release = %d", Pending())
	}
	if r := NewEncryptResponse(0, nil, 1); len(r.Ciphertexts) != 0 || Pending() != 0 {
		t.Fatal("an empty response is pending")
	}
}
