package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"encoding/asn1"
	"fmt"
	"slices"

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

// tokenObject is a key object on the token with a root key label.
type tokenObject struct {
	handle  pkcs11.ObjectHandle
	class   uint
	keyType uint
}

// tokenRoots are the key objects with root key labels on a token, by kind
// and version (kinds this package does not know included).
type tokenRoots map[string]map[uint32][]tokenObject

// scanRoots finds every secret, private and public key object whose label
// parses as "hsmd/<kind>/v<N>".
func scanRoots(m Module, s pkcs11.SessionHandle) (tokenRoots, error) {
	found := tokenRoots{}
	for _, class := range []uint{pkcs11.CKO_SECRET_KEY, pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
		hs, err := findObjects(m, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)})
		if err != nil {
			return nil, err
		}
		for _, o := range hs {
			a, err := m.GetAttributeValue(s, o, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
				pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
			})
			if err != nil {
				return nil, err
			}
			kind, v, ok := parseLabel(string(a[0].Value))
			if !ok {
				continue
			}
			if found[kind] == nil {
				found[kind] = map[uint32][]tokenObject{}
			}
			found[kind][v] = append(found[kind][v], tokenObject{o, class, bytesToUint(a[1].Value)})
		}
	}
	return found, nil
}

// versions returns the versions of kind found, ascending.
func (r tokenRoots) versions(kind string) []uint32 {
	vs := make([]uint32, 0, len(r[kind]))
	for v := range r[kind] {
		vs = append(vs, v)
	}
	slices.Sort(vs)
	return vs
}

// split checks that objs are exactly the objects of one key of spec and
// returns the key object and, for a pair, the public object.
func (spec kindSpec) split(label string, objs []tokenObject) (key, pub pkcs11.ObjectHandle, err error) {
	var nKey, nPub int
	for _, o := range objs {
		switch {
		case o.keyType != spec.keyType:
			return 0, 0, fmt.Errorf("hsm: %s has key type 0x%x, want 0x%x", label, o.keyType, spec.keyType)
		case o.class == spec.class:
			key, nKey = o.handle, nKey+1
		case spec.pair && o.class == pkcs11.CKO_PUBLIC_KEY:
			pub, nPub = o.handle, nPub+1
		default:
			return 0, 0, fmt.Errorf("hsm: %s: unexpected object of class 0x%x", label, o.class)
		}
	}
	switch {
	case nKey == 0:
		return 0, 0, fmt.Errorf("%w: %s", ErrKeyNotFound, label)
	case spec.pair && nPub == 0:
		return 0, 0, fmt.Errorf("%w: public key %s", ErrKeyNotFound, label)
	case nKey > 1 || nPub > 1:
		return 0, 0, fmt.Errorf("hsm: several objects labelled %s of the same class; labels must be unique", label)
	}
	return key, pub, nil
}

// buildKeySet loads every key of a known kind in found, checking that each
// is complete and of the right type, and records for each secret key the
// answer by which recovery recognises it. A kind may have no version. The
// handles are of generation gen.
func buildKeySet(m Module, s pkcs11.SessionHandle, found tokenRoots, gen uint64) (*keySet, error) {
	ks := &keySet{byKind: map[string]map[uint32]rootKey{}}
	for _, spec := range rootKinds {
		ks.byKind[spec.kind] = map[uint32]rootKey{}
		for _, v := range found.versions(spec.kind) {
			label := KeyLabel(spec.kind, v)
			key, pubObj, err := spec.split(label, found[spec.kind][v])
			if err != nil {
				return nil, err
			}
			k := rootKey{obj: objRef{key, gen}}
			if spec.pair {
				k.pub, err = readPublic(m, s, spec, label, pubObj)
			} else {
				k.check, err = recordCheck(m, s, spec, key)
			}
			if err != nil {
				return nil, err
			}
			ks.byKind[spec.kind][v] = k
		}
	}
	return ks, nil
}

// LoadKeys looks up the hsmd keys on the token once and keeps their
// handles: every version of hsmd/kdk/vN, hsmd/wrap/vN, hsmd/sig-p256/vN and
// hsmd/sig-ed25519/vN, with the public keys of the signing pairs. Each kind
// needs at least one version; a missing kind gives an error wrapping
// ErrKeyNotFound that names its label. A key of the wrong type, half a key
// pair or two objects of one class with the same label is an error too.
// Call it once at start-up (serve) or again after keys were added by
// another process; ImportRoots, CreateRoots and DestroyRoot update the
// loaded keys themselves. It is safe for concurrent use with other
// operations, which see the old or the new set.
func (h *HSM) LoadKeys(ctx context.Context) error {
	ks, gen, err := h.scanKeySet(ctx, "load keys")
	if err != nil {
		return err
	}
	for _, spec := range rootKinds {
		if len(ks.byKind[spec.kind]) == 0 {
			return fmt.Errorf("%w: %s (no key labelled %s/vN)", ErrKeyNotFound, KeyLabel(spec.kind, 1), labelPrefix+spec.kind)
		}
	}
	return h.storeKeys("load keys", ks, gen)
}

// scanKeySet reads the root keys from the token, with handles of the
// generation it returns.
func (h *HSM) scanKeySet(ctx context.Context, op string) (*keySet, uint64, error) {
	var ks *keySet
	gen := h.gen.Load()
	err := h.doAt(ctx, op, gen, func(m Module, s pkcs11.SessionHandle) error {
		found, err := scanRoots(m, s)
		if err != nil {
			return err
		}
		ks, err = buildKeySet(m, s, found, gen)
		return err
	})
	return ks, gen, err
}

// storeKeys makes ks, found in generation gen, the loaded keys, unless a
// recovery has renewed the handles since (a retryable error).
func (h *HSM) storeKeys(op string, ks *keySet, gen uint64) error {
	h.keysMu.Lock()
	defer h.keysMu.Unlock()
	if h.gen.Load() != gen {
		return fmt.Errorf("hsm: %s: %w", op, errStaleHandles)
	}
	h.keys.Store(ks)
	return nil
}

// refreshKeys replaces the loaded keys with those on the token after this
// HSM changed them; unlike LoadKeys it accepts a kind without keys. It
// runs even if ctx was cancelled (the change is made), within CallTimeout.
func (h *HSM) refreshKeys(ctx context.Context, op string) error {
	ks, gen, err := h.scanKeySet(context.WithoutCancel(ctx), op)
	if err == nil {
		err = h.storeKeys(op, ks, gen)
	}
	if err != nil {
		return fmt.Errorf("hsm: %s: the token was changed but reloading its keys failed (call LoadKeys): %w", op, err)
	}
	return nil
}

// readPublic reads the public key of a signing pair from its public object.
func readPublic(m Module, s pkcs11.SessionHandle, spec kindSpec, label string, o pkcs11.ObjectHandle) (crypto.PublicKey, error) {
	point, err := publicPoint(m, s, label, o)
	if err != nil {
		return nil, err
	}
	if spec.kind == KindSigEd25519 {
		if len(point) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("hsm: public key %s: %d bytes, want %d", label, len(point), ed25519.PublicKeySize)
		}
		return ed25519.PublicKey(point), nil
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
	if err != nil {
		return nil, fmt.Errorf("hsm: public key %s: %w", label, err)
	}
	return pub, nil
}

// publicPoint reads CKA_EC_POINT of the public key object o labelled label
// and removes its DER OCTET STRING wrapping (some modules return it bare).
func publicPoint(m Module, s pkcs11.SessionHandle, label string, o pkcs11.ObjectHandle) ([]byte, error) {
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
