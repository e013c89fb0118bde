package hsm

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
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

// Labels of the root keys InitKeys creates.
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
	oidEd25519 = []byte{0x06, 0x03, 0x2b, 0x65, 0x70}                               // 1.3.101.112 (SoftHSM 2.6 accepts the OID form)
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

// parseKDKLabel returns the version of a "hsmd/kdk/vN" label.
func parseKDKLabel(label string) (uint32, bool) {
	rest, ok := strings.CutPrefix(label, labelPrefix+KindKDK+"/v")
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseUint(rest, 10, 32)
	if err != nil || v == 0 || strconv.FormatUint(v, 10) != rest {
		return 0, false
	}
	return uint32(v), true
}

// keySet holds the handles LoadKeys found. It is immutable once built.
type keySet struct {
	kdk     map[uint32]pkcs11.ObjectHandle
	wrap    pkcs11.ObjectHandle
	p256    pkcs11.ObjectHandle
	p256Pub *ecdsa.PublicKey
	ed      pkcs11.ObjectHandle
	edPub   ed25519.PublicKey
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

func kdkTemplate(label string) []*pkcs11.Attribute {
	return append(secretKeyAttrs(label),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		// 32 bytes: the HMAC-SHA256 key length SoftHSM requires at least.
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
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

func wrapTemplate(label string) []*pkcs11.Attribute {
	return append(secretKeyAttrs(label),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		// AES-256.
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		// AES-GCM encrypt/decrypt of data, nothing else.
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
	)
}

// keyPairTemplates returns the public and private templates of an EC or
// EdDSA signing key pair on curve (DER OID).
func keyPairTemplates(label string, keyType uint, curve []byte) (pub, priv []*pkcs11.Attribute) {
	pub = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, KeyID(label)),
		// Persistent, readable without login (it is public), verify only.
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, curve),
	}
	priv = append(rootKeyAttrs(label),
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		// Signs; nothing else.
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
	)
	return pub, priv
}

// NewestKDK returns the highest kdk version LoadKeys found: new tenant key
// versions derive from it. It returns 0 before LoadKeys.
func (h *HSM) NewestKDK() uint32 {
	ks, err := h.loadedKeys()
	if err != nil {
		return 0
	}
	var n uint32
	for v := range ks.kdk {
		n = max(n, v)
	}
	return n
}
