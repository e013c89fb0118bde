// Package wire is the hsmd ciphertext format (docs/FORMAT.md): header layout,
// text form, and the byte strings that are authenticated or fed to the key
// derivation. It depends on the standard library alone, holds no keys and
// does no cryptography, so it can be fuzzed and reused on its own.
package wire

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"unicode"
)

// Format constants of version 1.
const (
	Version1 byte = 0x01
	// SuiteAES256GCM is suite 0x01: HMAC-SHA256 (HSM) + HKDF-SHA256 DEK,
	// AES-256-GCM items.
	SuiteAES256GCM byte = 0x01

	SeedSize   = 16
	NonceSize  = 12
	TagSize    = 16
	HeaderSize = 2 + 8 + 4 + SeedSize + NonceSize // 42
	Overhead   = HeaderSize + TagSize             // 58

	// MaxTenantLen is the longest tenant name the format can carry.
	MaxTenantLen = 64

	// TextPrefix starts the text form of a ciphertext.
	TextPrefix = "hsmd:v1:"

	// DEKLabel starts the message HMAC'd by the kdk; SuiteLabel is the HKDF
	// info of suite 0x01.
	DEKLabel   = "hsmd/dek/v1"
	SuiteLabel = "hsmd/v1/hmac-sha256-hkdf/aes-256-gcm"
)

// ErrMalformed: the input is not an hsmd ciphertext (too short, unknown
// version or suite, bad text form). Every other failure is a decryption
// failure, reported by the envelope package as one error.
var ErrMalformed = errors.New("not an hsmd ciphertext")

// Header is the fixed-size header of a version 1 ciphertext.
type Header struct {
	Version    byte
	Suite      byte
	TenantID   uint64
	KeyVersion uint32
	Seed       [SeedSize]byte
	Nonce      [NonceSize]byte
}

// Put writes h into b[:HeaderSize]. It panics if b is shorter.
func (h *Header) Put(b []byte) {
	_ = b[HeaderSize-1]
	b[0], b[1] = h.Version, h.Suite
	binary.BigEndian.PutUint64(b[2:10], h.TenantID)
	binary.BigEndian.PutUint32(b[10:14], h.KeyVersion)
	copy(b[14:30], h.Seed[:])
	copy(b[30:42], h.Nonce[:])
}

// Parse splits a binary ciphertext into its header and the rest
// (ciphertext || tag). It checks only the structure: an error wraps
// ErrMalformed. Tenant id and key version are not checked (zero or unknown
// values fail decryption instead, like any other tampering).
func Parse(ct []byte) (Header, []byte, error) {
	var h Header
	if len(ct) < Overhead {
		return h, nil, fmt.Errorf("%w: %d bytes, the minimum is %d", ErrMalformed, len(ct), Overhead)
	}
	if ct[0] != Version1 {
		return h, nil, fmt.Errorf("%w: unsupported format version %d", ErrMalformed, ct[0])
	}
	if ct[1] != SuiteAES256GCM {
		return h, nil, fmt.Errorf("%w: unsupported suite %d", ErrMalformed, ct[1])
	}
	h.Version, h.Suite = ct[0], ct[1]
	h.TenantID = binary.BigEndian.Uint64(ct[2:10])
	h.KeyVersion = binary.BigEndian.Uint32(ct[10:14])
	copy(h.Seed[:], ct[14:30])
	copy(h.Nonce[:], ct[30:42])
	return h, ct[HeaderSize:], nil
}

var b64 = base64.RawURLEncoding.Strict()

// IsText reports whether b (after leading whitespace, as bytes.TrimSpace
// sees it) starts with the text prefix.
func IsText(b []byte) bool {
	return bytes.HasPrefix(bytes.TrimLeftFunc(b, unicode.IsSpace), []byte(TextPrefix))
}

// AppendText appends the text form of the binary ciphertext ct to dst.
func AppendText(dst, ct []byte) []byte {
	dst = append(dst, TextPrefix...)
	return b64.AppendEncode(dst, ct)
}

// EncodeText returns the text form of ct.
func EncodeText(ct []byte) string { return string(AppendText(nil, ct)) }

// DecodeText returns the binary ciphertext of a text form. Surrounding
// whitespace is ignored. An error wraps ErrMalformed.
func DecodeText(s []byte) ([]byte, error) {
	s = bytes.TrimSpace(s)
	if !bytes.HasPrefix(s, []byte(TextPrefix)) {
		return nil, fmt.Errorf("%w: text form must start with %q", ErrMalformed, TextPrefix)
	}
	s = s[len(TextPrefix):]
	// The decoder skips CR and LF even in strict mode: refuse them (and
	// anything else outside the alphabet), so each ciphertext has exactly
	// one text form.
	for _, c := range s {
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return nil, fmt.Errorf("%w: text form is not unpadded base64url", ErrMalformed)
		}
	}
	out := make([]byte, b64.DecodedLen(len(s)))
	n, err := b64.Decode(out, s)
	if err != nil {
		return nil, fmt.Errorf("%w: text form is not unpadded base64url", ErrMalformed)
	}
	return out[:n], nil
}

// AppendAAD appends the additional authenticated data of an item: the
// header, the tenant name and the canonical encoding of its context.
func AppendAAD(dst, header []byte, tenant string, context map[string]string) []byte {
	dst = append(dst, header...)
	dst = append(dst, byte(len(tenant)))
	dst = append(dst, tenant...)
	return AppendContext(dst, context)
}

// AppendContext appends the canonical encoding of a context map: a count,
// then each key and value length-prefixed, in bytewise key order.
func AppendContext(dst []byte, context map[string]string) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(context)))
	switch len(context) {
	case 0:
		return dst
	case 1:
		for k, v := range context {
			dst = appendField(dst, k)
			dst = appendField(dst, v)
		}
		return dst
	}
	var kbuf [16]string // most contexts are small: sort them without allocating
	keys := kbuf[:0]
	for k := range context {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		dst = appendField(dst, k)
		dst = appendField(dst, context[k])
	}
	return dst
}

func appendField(dst []byte, s string) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(s)))
	return append(dst, s...)
}

// ContextSize returns the length of the canonical encoding of context.
func ContextSize(context map[string]string) int {
	n := 4
	for k, v := range context {
		n += 8 + len(k) + len(v)
	}
	return n
}

// AppendDEKMessage appends the message that the kdk HMACs to derive the
// input key material of a DEK (docs/FORMAT.md, suite 0x01).
func AppendDEKMessage(dst []byte, tenant string, tenantID uint64, keyVersion uint32, salt []byte, seed [SeedSize]byte) []byte {
	dst = append(dst, DEKLabel...)
	dst = append(dst, 0)
	dst = append(dst, byte(len(tenant)))
	dst = append(dst, tenant...)
	dst = binary.BigEndian.AppendUint64(dst, tenantID)
	dst = binary.BigEndian.AppendUint32(dst, keyVersion)
	dst = append(dst, salt...)
	return append(dst, seed[:]...)
}
