package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// findObjects returns the handles of the objects matching temp.
func findObjects(m Module, s pkcs11.SessionHandle, temp []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := m.FindObjectsInit(s, temp); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for {
		hs, _, err := m.FindObjects(s, 64)
		if err != nil {
			_ = m.FindObjectsFinal(s)
			return nil, err
		}
		if len(hs) == 0 {
			break
		}
		all = append(all, hs...)
	}
	return all, m.FindObjectsFinal(s)
}

// findOne returns the single object of class with label.
func findOne(m Module, s pkcs11.SessionHandle, class uint, label string) (pkcs11.ObjectHandle, error) {
	hs, err := findObjects(m, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	})
	switch {
	case err != nil:
		return 0, err
	case len(hs) == 0:
		return 0, fmt.Errorf("%w: %s", ErrKeyNotFound, label)
	case len(hs) > 1:
		return 0, fmt.Errorf("hsm: %d objects labelled %s of the same class; labels must be unique", len(hs), label)
	}
	return hs[0], nil
}

// objectLabel reads CKA_LABEL of o.
func objectLabel(m Module, s pkcs11.SessionHandle, o pkcs11.ObjectHandle) (string, error) {
	attrs, err := m.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
	if err != nil {
		return "", err
	}
	return string(attrs[0].Value), nil
}

// LoadKeys looks up the hsmd keys on the token once and keeps their
// handles: every "hsmd/kdk/vN" (at least one), hsmd/wrap/v1,
// hsmd/sig-p256/v1 and hsmd/sig-ed25519/v1 with their public keys. A missing
// key gives an error wrapping ErrKeyNotFound that names its label. Call it
// once at start-up (serve) or again after keys were added; it is safe for
// concurrent use with other operations, which see the old or the new set.
func (h *HSM) LoadKeys(ctx context.Context) error {
	var ks *keySet
	err := h.do(ctx, "load keys", func(m Module, s pkcs11.SessionHandle) error {
		var err error
		ks, err = loadKeySet(m, s)
		return err
	})
	if err != nil {
		return err
	}
	h.keys.Store(ks)
	return nil
}

func loadKeySet(m Module, s pkcs11.SessionHandle) (*keySet, error) {
	kdk, err := findKDKs(m, s)
	if err != nil {
		return nil, err
	}
	ks := &keySet{kdk: kdk}
	if ks.wrap, err = findOne(m, s, pkcs11.CKO_SECRET_KEY, LabelWrapv1); err != nil {
		return nil, err
	}
	if ks.p256, err = findOne(m, s, pkcs11.CKO_PRIVATE_KEY, LabelSigP256v1); err != nil {
		return nil, err
	}
	if ks.ed, err = findOne(m, s, pkcs11.CKO_PRIVATE_KEY, LabelSigEd25519v1); err != nil {
		return nil, err
	}
	point, err := publicPoint(m, s, LabelSigP256v1)
	if err != nil {
		return nil, err
	}
	if ks.p256Pub, err = ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point); err != nil {
		return nil, fmt.Errorf("hsm: public key %s: %w", LabelSigP256v1, err)
	}
	if point, err = publicPoint(m, s, LabelSigEd25519v1); err != nil {
		return nil, err
	}
	if len(point) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("hsm: public key %s: %d bytes, want %d", LabelSigEd25519v1, len(point), ed25519.PublicKeySize)
	}
	ks.edPub = ed25519.PublicKey(point)
	return ks, nil
}

// findKDKs returns every generic secret labelled "hsmd/kdk/vN" by version.
func findKDKs(m Module, s pkcs11.SessionHandle) (map[uint32]pkcs11.ObjectHandle, error) {
	hs, err := findObjects(m, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
	})
	if err != nil {
		return nil, err
	}
	kdk := map[uint32]pkcs11.ObjectHandle{}
	for _, o := range hs {
		label, err := objectLabel(m, s, o)
		if err != nil {
			return nil, err
		}
		if v, ok := parseKDKLabel(label); ok {
			if _, dup := kdk[v]; dup {
				return nil, fmt.Errorf("hsm: several keys labelled %s; labels must be unique", label)
			}
			kdk[v] = o
		}
	}
	if len(kdk) == 0 {
		return nil, fmt.Errorf("%w: %s (no key labelled %s/vN)", ErrKeyNotFound, LabelKDKv1, labelPrefix+KindKDK)
	}
	return kdk, nil
}

// publicPoint reads CKA_EC_POINT of the public key labelled label and
// removes its DER OCTET STRING wrapping (some modules return it bare).
func publicPoint(m Module, s pkcs11.SessionHandle, label string) ([]byte, error) {
	o, err := findOne(m, s, pkcs11.CKO_PUBLIC_KEY, label)
	if err != nil {
		return nil, err
	}
	attrs, err := m.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
	if err != nil {
		return nil, err
	}
	v := attrs[0].Value
	if len(v) == ed25519PublicKeySize || (len(v) == p256UncompressedKeySize && v[0] == 4) {
		return v, nil
	}
	var point []byte
	if rest, err := asn1.Unmarshal(v, &point); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("hsm: public key %s: malformed CKA_EC_POINT", label)
	}
	return point, nil
}

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
