package wire

import (
	"encoding/binary"
	"fmt"
)

// Suite 0x02: X-Wing HPKE (docs/FORMAT.md, "Suite 0x02"). A producer seals
// a record offline to a tenant key version's X-Wing public key with HPKE
// (RFC 9180, base mode) over MLKEM768-X25519, HKDF-SHA256 and AES-256-GCM;
// hsmd opens it with the version's private key.
const (
	// SuiteXWing is suite 0x02.
	SuiteXWing byte = 0x02

	// XWingPrefixSize is the part of the header that names the key:
	// version, suite, tenant_id, key_version.
	XWingPrefixSize = 2 + 8 + 4 // 14
	// XWingEncSize is the size of an X-Wing encapsulation (the HPKE enc).
	XWingEncSize = 1120
	// XWingPublicKeySize is the size of an X-Wing public key.
	XWingPublicKeySize = 1216
	// XWingPrivateKeySize is the size of an X-Wing private key (its seed).
	XWingPrivateKeySize = 32
	// XWingHeaderSize is the prefix and the encapsulation: 1134 bytes.
	XWingHeaderSize = XWingPrefixSize + XWingEncSize
	// XWingOverhead is the fixed overhead of a suite 0x02 ciphertext.
	XWingOverhead = XWingHeaderSize + TagSize // 1150

	// XWingLabel starts the HPKE info of suite 0x02.
	XWingLabel = "hsmd/v1/xwing-hpke/hkdf-sha256/aes-256-gcm"
	// XWingKeyLabel starts the AAD under which the HSM wrap key seals a
	// key version's X-Wing private key.
	XWingKeyLabel = "hsmd/xwing-key/v1"
)

// IsXWing reports whether ct starts like a suite 0x02 binary ciphertext
// (format version 1, suite 0x02), whatever its length.
func IsXWing(ct []byte) bool {
	return len(ct) >= 2 && ct[0] == Version1 && ct[1] == SuiteXWing
}

// PutXWingPrefix writes the first XWingPrefixSize bytes of a suite 0x02
// header into b. It panics if b is shorter.
func PutXWingPrefix(b []byte, tenantID uint64, keyVersion uint32) {
	_ = b[XWingPrefixSize-1]
	b[0], b[1] = Version1, SuiteXWing
	binary.BigEndian.PutUint64(b[2:10], tenantID)
	binary.BigEndian.PutUint32(b[10:14], keyVersion)
}

// ParseXWing splits a suite 0x02 binary ciphertext into its header (Seed
// and Nonce are zero: the suite has none), its encapsulation and the rest
// (HPKE ciphertext || tag). It checks only the structure: an error wraps
// ErrMalformed.
func ParseXWing(ct []byte) (h Header, enc, body []byte, err error) {
	if len(ct) < XWingOverhead {
		return h, nil, nil, fmt.Errorf("%w: %d bytes, the minimum for suite %d is %d", ErrMalformed, len(ct), SuiteXWing, XWingOverhead)
	}
	if !IsXWing(ct) {
		return h, nil, nil, fmt.Errorf("%w: not format version 1, suite %d", ErrMalformed, SuiteXWing)
	}
	h.Version, h.Suite = ct[0], ct[1]
	h.TenantID = binary.BigEndian.Uint64(ct[2:10])
	h.KeyVersion = binary.BigEndian.Uint32(ct[10:14])
	return h, ct[XWingPrefixSize:XWingHeaderSize], ct[XWingHeaderSize:], nil
}

// AppendXWingInfo appends the HPKE info of suite 0x02: the label, a zero
// byte, the tenant id, the key version and the tenant name.
func AppendXWingInfo(dst []byte, tenant string, tenantID uint64, keyVersion uint32) []byte {
	dst = append(dst, XWingLabel...)
	dst = append(dst, 0)
	dst = binary.BigEndian.AppendUint64(dst, tenantID)
	dst = binary.BigEndian.AppendUint32(dst, keyVersion)
	dst = append(dst, byte(len(tenant)))
	return append(dst, tenant...)
}

// AppendXWingAAD appends the HPKE AAD of a suite 0x02 item: the header
// prefix (XWingPrefixSize bytes of prefix), the tenant name and the
// canonical context, as AppendAAD does for suite 0x01.
func AppendXWingAAD(dst, prefix []byte, tenant string, context map[string]string) []byte {
	return AppendAAD(dst, prefix[:XWingPrefixSize], tenant, context)
}

// AppendXWingKeyAAD appends the AAD under which the HSM wrap key seals the
// X-Wing private key of (tenant id, key version).
func AppendXWingKeyAAD(dst []byte, tenantID uint64, keyVersion uint32) []byte {
	dst = append(dst, XWingKeyLabel...)
	dst = append(dst, 0)
	dst = binary.BigEndian.AppendUint64(dst, tenantID)
	return binary.BigEndian.AppendUint32(dst, keyVersion)
}
