package hsm

import (
	"crypto"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"maps"
	"strconv"
	"strings"

	"github.com/miekg/pkcs11"
)

// Key kinds, used in labels "hsmd/<kind>/v<version>".
const (
	KindKDK        = "kdk"         // HMAC-SHA256 generic secret: the data-key PRF
	KindWrap       = "wrap"        // AES-256: AES-GCM for the few secrets kept outside the HSM
	KindSigP256    = "sig-p256"    // ECDSA P-256 signing key pair
	KindSigEd25519 = "sig-ed25519" // Ed25519 signing key pair
)

// Labels of the root keys InitKeys creates (version 1).
const (
	LabelKDKv1        = "hsmd/kdk/v1"
	LabelWrapv1       = "hsmd/wrap/v1"
	LabelSigP256v1    = "hsmd/sig-p256/v1"
	LabelSigEd25519v1 = "hsmd/sig-ed25519/v1"
)

// labelPrefix starts the CKA_LABEL of every hsmd object.
const labelPrefix = "hsmd/"

// PKCS#11 3.0 values missing from github.com/miekg/pkcs11 v1.1.2.
const (
	ckkECEdwards            = 0x40
	ckmECEdwardsKeyPairGen  = 0x1055
	ckmEdDSA                = 0x1057
	ed25519PublicKeySize    = ed25519.PublicKeySize
	p256UncompressedKeySize = 65
)

// DER encodings of the curve OIDs for CKA_EC_PARAMS.
var (
	oidP256    = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // 1.2.840.10045.3.1.7
	oidEd25519 = []byte{0x06, 0x03, 0x2b, 0x65, 0x70}                               // 1.3.101.112 (SoftHSM 2.6.1 accepts the OID form for generation and for C_CreateObject)
)

// KeyLabel returns the CKA_LABEL of key kind at version, e.g.
// KeyLabel(KindKDK, 1) == "hsmd/kdk/v1".
func KeyLabel(kind string, version uint32) string {
	return labelPrefix + kind + "/v" + strconv.FormatUint(uint64(version), 10)
}

// RootKeyLabels returns the labels of the keys InitKeys creates.
func RootKeyLabels() []string {
	return []string{LabelKDKv1, LabelWrapv1, LabelSigP256v1, LabelSigEd25519v1}
}

// KeyID returns the CKA_ID set on the key (pair) with label: the first 8
// bytes of SHA-256(label), stable and free of secrets.
func KeyID(label string) []byte {
	sum := sha256.Sum256([]byte(label))
	return sum[:8]
}

// parseLabel splits a root key label "hsmd/<kind>/v<N>" (N > 0, in
// canonical decimal, kind without "/").
func parseLabel(label string) (kind string, version uint32, ok bool) {
	rest, ok := strings.CutPrefix(label, labelPrefix)
	if !ok {
		return "", 0, false
	}
	kind, num, ok := strings.Cut(rest, "/v")
	if !ok || kind == "" || strings.Contains(kind, "/") {
		return "", 0, false
	}
	v, err := strconv.ParseUint(num, 10, 32)
	if err != nil || v == 0 || strconv.FormatUint(v, 10) != num {
		return "", 0, false
	}
	return kind, uint32(v), true
}

// kindSpec describes the PKCS#11 objects of one key kind.
type kindSpec struct {
	kind    string
	class   uint // class of the key object: CKO_SECRET_KEY or CKO_PRIVATE_KEY
	keyType uint
	pair    bool   // a public object with the same label and CKA_ID goes with it
	curve   []byte // CKA_EC_PARAMS of a pair
	genMech uint   // generation mechanism
}

// rootKinds are the kinds of root keys, in the order they are created.
var rootKinds = []kindSpec{
	{kind: KindKDK, class: pkcs11.CKO_SECRET_KEY, keyType: pkcs11.CKK_GENERIC_SECRET, genMech: pkcs11.CKM_GENERIC_SECRET_KEY_GEN},
	{kind: KindWrap, class: pkcs11.CKO_SECRET_KEY, keyType: pkcs11.CKK_AES, genMech: pkcs11.CKM_AES_KEY_GEN},
	{kind: KindSigP256, class: pkcs11.CKO_PRIVATE_KEY, keyType: pkcs11.CKK_EC, pair: true, curve: oidP256, genMech: pkcs11.CKM_EC_KEY_PAIR_GEN},
	{kind: KindSigEd25519, class: pkcs11.CKO_PRIVATE_KEY, keyType: ckkECEdwards, pair: true, curve: oidEd25519, genMech: ckmECEdwardsKeyPairGen},
}

// RootKinds returns the kinds of root keys: KindKDK, KindWrap,
// KindSigP256 and KindSigEd25519.
func RootKinds() []string {
	out := make([]string, len(rootKinds))
	for i, k := range rootKinds {
		out[i] = k.kind
	}
	return out
}

func specOf(kind string) (kindSpec, bool) {
	for _, k := range rootKinds {
		if k.kind == kind {
			return k, true
		}
	}
	return kindSpec{}, false
}

// anyGen is the generation of an operation that uses no object handle
// found by an earlier call.
const anyGen = ^uint64(0)

// objRef is an object handle and the generation (the count of recoveries,
// HSM.gen) in which it was found. After a recovery the token may be another
// copy whose handle numbers mean other objects, so a handle is used only
// in its own generation (doAt).
type objRef struct {
	h   pkcs11.ObjectHandle
	gen uint64
}

// rootKey is one loaded root key: the handle of its secret or private
// object, for a signing pair the public key read from the token, and for a
// secret key the answer recorded at load by which recovery recognises it
// (see recordCheck).
type rootKey struct {
	obj   objRef
	pub   crypto.PublicKey
	check []byte
}

// keySet holds the handles LoadKeys found, by kind and version. It is
// immutable once built.
type keySet struct {
	byKind map[string]map[uint32]rootKey
}

// get returns the key of kind at version.
func (ks *keySet) get(kind string, v uint32) (rootKey, bool) {
	k, ok := ks.byKind[kind][v]
	return k, ok
}

// newest returns the highest loaded version of kind, or 0 if there is none.
func (ks *keySet) newest(kind string) uint32 {
	var n uint32
	for v := range ks.byKind[kind] {
		n = max(n, v)
	}
	return n
}

// lowest returns the lowest loaded version of kind, or 0 if there is none.
func (ks *keySet) lowest(kind string) uint32 {
	var n uint32
	for v := range ks.byKind[kind] {
		if n == 0 || v < n {
			n = v
		}
	}
	return n
}

// without returns a copy of ks without kind at version.
func (ks *keySet) without(kind string, v uint32) *keySet {
	out := &keySet{byKind: make(map[string]map[uint32]rootKey, len(ks.byKind))}
	for k, vs := range ks.byKind {
		out.byKind[k] = maps.Clone(vs)
	}
	delete(out.byKind[kind], v)
	return out
}

func (h *HSM) loadedKeys() (*keySet, error) {
	ks := h.keys.Load()
	if ks == nil {
		return nil, fmt.Errorf("%w: keys not loaded (call LoadKeys)", ErrKeyNotFound)
	}
	return ks, nil
}

// rootKeyAttrs are the attributes every root (secret or private) key gets.
func rootKeyAttrs(label string) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, KeyID(label)),
		// Persistent on the token, not a session object.
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		// Visible and usable only after user login.
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		// The key value can never be read out in plaintext.
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		// The key can never be wrapped out of the HSM, not even encrypted.
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		// The key cannot unwrap other keys into the token; it does one job.
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		// No key derivation from it (derivation goes through HMAC only).
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		// Its attributes cannot be changed later (C_SetAttributeValue): a
		// logged-in user cannot give it another use (CKA_WRAP, CKA_DERIVE,
		// CKA_DECRYPT...) or relabel it to pass it off as another key.
		pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
		// C_CopyObject cannot clone it (a copy could be given weaker
		// attributes where the module allows that).
		pkcs11.NewAttribute(pkcs11.CKA_COPYABLE, false),
	}
}

// secretKeyAttrs are rootKeyAttrs plus what only secret keys have.
func secretKeyAttrs(label string) []*pkcs11.Attribute {
	return append(rootKeyAttrs(label),
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		// The key cannot wrap (export) other keys.
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
	)
}

// secretTemplate returns the template of the secret key of spec (kdk or
// wrap) labelled label, without its size or value: generation adds
// CKA_VALUE_LEN, import CKA_VALUE, so that generated and imported keys get
// the same attributes.
func secretTemplate(spec kindSpec, label string) []*pkcs11.Attribute {
	t := append(secretKeyAttrs(label), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, spec.keyType))
	if spec.kind == KindKDK {
		return append(t,
			// HMAC is a PKCS#11 sign operation; hsmd only ever computes it
			// (C_Sign), never checks one, so C_Verify is off (SoftHSM would
			// default it to on).
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
			// Not a cipher key.
			pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
			pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		)
	}
	return append(t,
		// AES-GCM encrypt/decrypt of data, nothing else.
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
	)
}

// rootSecretSize is the size of every root secret: the HMAC-SHA256 key
// length SoftHSM requires at least, AES-256, and the Ed25519 seed and
// P-256 scalar.
const rootSecretSize = 32

// keyPairTemplates returns the public and private templates of an EC or
// EdDSA signing key pair of spec labelled label, without key values:
// import adds CKA_EC_POINT to the public template and CKA_EC_PARAMS and
// CKA_VALUE to the private one.
func keyPairTemplates(spec kindSpec, label string) (pub, priv []*pkcs11.Attribute) {
	pub = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, spec.keyType),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, KeyID(label)),
		// Persistent, readable without login (it is public), verify only.
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, spec.curve),
	}
	priv = append(rootKeyAttrs(label),
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, spec.keyType),
		// Signs; nothing else.
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
	)
	return pub, priv
}

// NewestKDK returns the highest kdk version loaded: new tenant key
// versions derive from it. It returns 0 before LoadKeys. ImportRoots,
// CreateRoots and DestroyRoot update it.
func (h *HSM) NewestKDK() uint32 {
	ks, err := h.loadedKeys()
	if err != nil {
		return 0
	}
	return ks.newest(KindKDK)
}
