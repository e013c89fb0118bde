package quorum

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Operation kinds that need a quorum.
const (
	KindShredTenant    = "shred-tenant"
	KindDestroyVersion = "destroy-version"
	KindDestroyRoot    = "destroy-root"
	KindRestore        = "restore"
	KindRotateKDK      = "rotate-kdk"
)

// Kinds lists the operation kinds, sorted.
var Kinds = []string{KindDestroyRoot, KindDestroyVersion, KindRestore, KindRotateKDK, KindShredTenant}

// Limits on an Operation, so that a request stays small and readable.
const (
	MaxParams        = 32
	MaxParamKeyLen   = 64
	MaxParamValueLen = 1024
)

// operationLabel separates Operation digests from every other SHA-256 use.
const operationLabel = "hsmd quorum operation v1\x00"

// Operation is a destructive operation exactly as it will run: its Kind and
// every parameter that changes what it does (tenant, key name, version...).
// Two operations with the same Kind and Params are the same operation.
type Operation struct {
	Kind   string
	Params map[string]string
}

// Validate checks the kind is one of Kinds, that there are at most
// MaxParams parameters, that each key is 1 to MaxParamKeyLen characters
// from [a-z0-9_.-] starting with a letter or digit, and that each value is
// 1 to MaxParamValueLen bytes of printable UTF-8 (spaces allowed, not at
// either end). Errors wrap ErrInvalidOperation.
func (o Operation) Validate() error {
	if !slices.Contains(Kinds, o.Kind) {
		return fmt.Errorf("%w: unknown kind %q (want one of %s)", ErrInvalidOperation, o.Kind, strings.Join(Kinds, ", "))
	}
	if len(o.Params) > MaxParams {
		return fmt.Errorf("%w: %d parameters, at most %d", ErrInvalidOperation, len(o.Params), MaxParams)
	}
	for k, v := range o.Params {
		if !validParamKey(k) {
			return fmt.Errorf("%w: parameter key %q: want 1-%d of [a-z0-9_.-], starting with a letter or digit", ErrInvalidOperation, k, MaxParamKeyLen)
		}
		if !validParamValue(v) {
			return fmt.Errorf("%w: parameter %s: value must be 1-%d bytes of printable UTF-8, no space at either end", ErrInvalidOperation, k, MaxParamValueLen)
		}
	}
	return nil
}

func validParamKey(k string) bool {
	if k == "" || len(k) > MaxParamKeyLen {
		return false
	}
	for i, c := range []byte(k) {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '_' || c == '.' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

func validParamValue(v string) bool {
	if v == "" || len(v) > MaxParamValueLen || !utf8.ValidString(v) {
		return false
	}
	if strings.TrimSpace(v) != v {
		return false
	}
	for _, r := range v {
		if !unicode.IsGraphic(r) {
			return false
		}
	}
	return true
}

// Canonical returns the unambiguous encoding that Digest hashes:
//
//	"hsmd quorum operation v1\x00"
//	u64(len(kind)) kind
//	u64(number of params)
//	for each param, sorted by key: u64(len(key)) key u64(len(value)) value
//
// with big-endian u64 lengths in bytes. It does not validate o.
func (o Operation) Canonical() []byte {
	b := []byte(operationLabel)
	b = appendString(b, o.Kind)
	b = binary.BigEndian.AppendUint64(b, uint64(len(o.Params)))
	for _, k := range slices.Sorted(maps.Keys(o.Params)) {
		b = appendString(b, k)
		b = appendString(b, o.Params[k])
	}
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(len(s)))
	return append(b, s...)
}

// Digest is SHA-256 of Canonical. It identifies the operation an approval
// is for.
func (o Operation) Digest() [32]byte { return sha256.Sum256(o.Canonical()) }

// String describes the operation for humans: kind then sorted k=v pairs.
func (o Operation) String() string {
	var b strings.Builder
	b.WriteString(o.Kind)
	for _, k := range slices.Sorted(maps.Keys(o.Params)) {
		fmt.Fprintf(&b, " %s=%q", k, o.Params[k])
	}
	return b.String()
}
