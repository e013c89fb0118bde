package grpccodec

import (
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// The parsers below fill a batch message from b with its bytes fields
// aliasing b and its items allocated together, in place of proto.Unmarshal,
// which allocates and copies every item. Each reports false, leaving m in
// an unspecified state, for anything but the plain form hsmd's clients
// send (an unknown field, a field of the wrong wire type, a string that is
// not UTF-8, a malformed length): the caller then uses proto.Unmarshal,
// which gives the answer (or the error) the message deserves. A parser
// that returns true has produced exactly what proto.Unmarshal would (a
// fuzz test compares them).

// field is one top-level or nested field: its number, wire type and, for
// the length-delimited type, its bytes; for varints, its value.
type field struct {
	num protowire.Number
	typ protowire.Type
	buf []byte
	v   uint64
}

// fields calls f for each field of b. It returns false on malformed input
// or if f does.
func fields(b []byte, f func(field) bool) bool {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		fl := field{num: num, typ: typ}
		switch typ {
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return false
			}
			fl.buf = v[:len(v):len(v)]
			b = b[n:]
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return false
			}
			fl.v = v
			b = b[n:]
		default:
			return false
		}
		if !f(fl) {
			return false
		}
	}
	return true
}

// count returns how many fields number num of type BytesType b holds, or
// -1 if b is malformed. It sizes the item slabs.
func count(b []byte, num protowire.Number) int {
	n := 0
	if !fields(b, func(f field) bool {
		if f.num == num && f.typ == protowire.BytesType {
			n++
		}
		return true
	}) {
		return -1
	}
	return n
}

func str(f field) (string, bool) {
	if f.typ != protowire.BytesType || !utf8.Valid(f.buf) {
		return "", false
	}
	return string(f.buf), true
}

// contextEntry adds one map<string, string> entry to *m.
func contextEntry(f field, m *map[string]string) bool {
	if f.typ != protowire.BytesType {
		return false
	}
	var k, v string
	if !fields(f.buf, func(e field) bool {
		var ok bool
		switch e.num {
		case 1:
			k, ok = str(e)
		case 2:
			v, ok = str(e)
		}
		return ok
	}) {
		return false
	}
	if *m == nil {
		*m = make(map[string]string)
	}
	(*m)[k] = v
	return true
}

// item parses an EncryptItem or DecryptItem (the same shape: bytes 1,
// map<string, string> 2).
func item(b []byte, data *[]byte, ctx *map[string]string) bool {
	return fields(b, func(f field) bool {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			*data = f.buf
			return true
		case f.num == 2:
			return contextEntry(f, ctx)
		}
		return false
	})
}

// items parses the request fields tenant (1) and items (2), with n the
// number of items, calling add for each item's bytes.
func request(b []byte, tenant *string, add func([]byte) bool) bool {
	return fields(b, func(f field) bool {
		switch {
		case f.num == 1:
			var ok bool
			*tenant, ok = str(f)
			return ok
		case f.num == 2 && f.typ == protowire.BytesType:
			return add(f.buf)
		}
		return false
	})
}

// EncryptRequest parses b into m (see above).
func EncryptRequest(b []byte, m *hsmdv1.EncryptRequest) bool {
	n := count(b, 2)
	if n < 0 {
		return false
	}
	m.Reset()
	if n > 0 {
		m.Items = make([]*hsmdv1.EncryptItem, 0, n)
	}
	slab := make([]hsmdv1.EncryptItem, n)
	return request(b, &m.Tenant, func(ib []byte) bool {
		it := &slab[len(m.Items)]
		m.Items = append(m.Items, it)
		return item(ib, &it.Plaintext, &it.Context)
	})
}

// DecryptRequest parses b into m (see above).
func DecryptRequest(b []byte, m *hsmdv1.DecryptRequest) bool {
	n := count(b, 2)
	if n < 0 {
		return false
	}
	m.Reset()
	if n > 0 {
		m.Items = make([]*hsmdv1.DecryptItem, 0, n)
	}
	slab := make([]hsmdv1.DecryptItem, n)
	return request(b, &m.Tenant, func(ib []byte) bool {
		it := &slab[len(m.Items)]
		m.Items = append(m.Items, it)
		return item(ib, &it.Ciphertext, &it.Context)
	})
}

// EncryptResponse parses b into m (see above).
func EncryptResponse(b []byte, m *hsmdv1.EncryptResponse) bool {
	n := count(b, 1)
	if n < 0 {
		return false
	}
	m.Reset()
	if n > 0 {
		m.Ciphertexts = make([][]byte, 0, n)
	}
	return fields(b, func(f field) bool {
		switch {
		case f.num == 1 && f.typ == protowire.BytesType:
			m.Ciphertexts = append(m.Ciphertexts, f.buf)
			return true
		case f.num == 2 && f.typ == protowire.VarintType:
			m.KeyVersion = uint32(f.v)
			return true
		}
		return false
	})
}

// DecryptResponse parses b into m (see above). An item's error, rare, is
// left to proto (merged, as proto merges a repeated message field).
func DecryptResponse(b []byte, m *hsmdv1.DecryptResponse) bool {
	n := count(b, 1)
	if n < 0 {
		return false
	}
	m.Reset()
	if n > 0 {
		m.Results = make([]*hsmdv1.DecryptResult, 0, n)
	}
	slab := make([]hsmdv1.DecryptResult, n)
	return fields(b, func(f field) bool {
		if f.num != 1 || f.typ != protowire.BytesType {
			return false
		}
		r := &slab[len(m.Results)]
		m.Results = append(m.Results, r)
		return fields(f.buf, func(rf field) bool {
			switch {
			case rf.num == 1 && rf.typ == protowire.BytesType:
				r.Plaintext = rf.buf
				return true
			case rf.num == 2 && rf.typ == protowire.BytesType:
				if r.Error == nil {
					r.Error = new(hsmdv1.ItemError)
				}
				return proto.UnmarshalOptions{Merge: true}.Unmarshal(rf.buf, r.Error) == nil
			}
			return false
		})
	})
}
