package hsm

import (
	"context"
	"errors"

	"github.com/miekg/pkcs11"
)

// KeyInfo describes the protection attributes of a key.
type KeyInfo struct {
	Label         string
	ID            []byte
	Class         uint // CKO_SECRET_KEY or CKO_PRIVATE_KEY
	KeyType       uint // CKK_*
	Token         bool // CKA_TOKEN: persistent on the token
	Private       bool // CKA_PRIVATE: needs login
	Sensitive     bool // CKA_SENSITIVE: value never readable
	Extractable   bool // CKA_EXTRACTABLE: may be wrapped out
	Modifiable    bool // CKA_MODIFIABLE: attributes may be changed
	Copyable      bool // CKA_COPYABLE: C_CopyObject may clone it
	ValueReadable bool // reading CKA_VALUE succeeded (must be false for a root key)

	// Provenance, set by the token: true for keys generated inside it
	// (CreateRoots, InitKeys), false for imported ones (ImportRoots).
	Local            bool // CKA_LOCAL: generated in the token
	AlwaysSensitive  bool // CKA_ALWAYS_SENSITIVE: sensitive since creation inside the token
	NeverExtractable bool // CKA_NEVER_EXTRACTABLE: never extractable since creation inside the token

	// Usage (an attribute the object does not have reads as false).
	Sign, Verify, Encrypt, Decrypt, Wrap, Unwrap, Derive bool
}

// KeyInfo reads the attributes of the secret or private key labelled label
// (for a key pair, the private half). It never returns key bytes: if
// CKA_VALUE can be read, ValueReadable is true and the value is discarded.
// Errors: ErrKeyNotFound naming the label.
func (h *HSM) KeyInfo(ctx context.Context, label string) (KeyInfo, error) {
	var ki KeyInfo
	err := h.do(ctx, "key info", func(m Module, s pkcs11.SessionHandle) error {
		o, err := findOne(m, s, pkcs11.CKO_SECRET_KEY, label)
		if errors.Is(err, ErrKeyNotFound) {
			o, err = findOne(m, s, pkcs11.CKO_PRIVATE_KEY, label)
		}
		if err != nil {
			return err
		}
		ki, err = readKeyInfo(m, s, o)
		return err
	})
	return ki, err
}

func readKeyInfo(m Module, s pkcs11.SessionHandle, o pkcs11.ObjectHandle) (KeyInfo, error) {
	types := []uint{pkcs11.CKA_LABEL, pkcs11.CKA_ID, pkcs11.CKA_CLASS, pkcs11.CKA_KEY_TYPE,
		pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE,
		pkcs11.CKA_MODIFIABLE, pkcs11.CKA_COPYABLE}
	temp := make([]*pkcs11.Attribute, len(types))
	for i, t := range types {
		temp[i] = pkcs11.NewAttribute(t, nil)
	}
	a, err := m.GetAttributeValue(s, o, temp)
	if err != nil {
		return KeyInfo{}, err
	}
	ki := KeyInfo{
		Label: string(a[0].Value), ID: a[1].Value,
		Class: bytesToUint(a[2].Value), KeyType: bytesToUint(a[3].Value),
		Token: isTrue(a[4].Value), Private: isTrue(a[5].Value),
		Sensitive: isTrue(a[6].Value), Extractable: isTrue(a[7].Value),
		Modifiable: isTrue(a[8].Value), Copyable: isTrue(a[9].Value),
	}
	for _, f := range []struct {
		typ uint
		dst *bool
	}{
		{pkcs11.CKA_LOCAL, &ki.Local}, {pkcs11.CKA_ALWAYS_SENSITIVE, &ki.AlwaysSensitive},
		{pkcs11.CKA_NEVER_EXTRACTABLE, &ki.NeverExtractable},
		{pkcs11.CKA_SIGN, &ki.Sign}, {pkcs11.CKA_VERIFY, &ki.Verify},
		{pkcs11.CKA_ENCRYPT, &ki.Encrypt}, {pkcs11.CKA_DECRYPT, &ki.Decrypt},
		{pkcs11.CKA_WRAP, &ki.Wrap}, {pkcs11.CKA_UNWRAP, &ki.Unwrap}, {pkcs11.CKA_DERIVE, &ki.Derive},
	} {
		// One call each: a module fails the whole call for an attribute
		// the object's class lacks (CKA_WRAP of a private key).
		a, err := m.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(f.typ, nil)})
		switch {
		case err == nil && len(a) == 1:
			*f.dst = isTrue(a[0].Value)
		case err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)):
			return KeyInfo{}, err
		}
	}
	v, err := m.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err == nil && len(v) == 1 && len(v[0].Value) > 0 {
		ki.ValueReadable = true
		clear(v[0].Value)
	}
	return ki, nil
}

func isTrue(b []byte) bool { return len(b) == 1 && b[0] != 0 }

// bytesToUint decodes a CK_ULONG attribute (native byte order; little
// endian on every platform hsmd supports).
func bytesToUint(b []byte) uint {
	var v uint
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint(b[i])
	}
	return v
}
