package quorum

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/cloudflare/circl/sign/mldsa/mldsa44"
	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// KeyType names an operator key algorithm.
type KeyType string

// Operator key algorithms.
const (
	KeyEd25519 KeyType = "ed25519"   // note signature type 0x01
	KeyMLDSA44 KeyType = "ml-dsa-44" // note signature type 0x06 (cosignature/v1)
)

// Note signature types (the first byte of the base64 key), from the C2SP
// signed-note signature type registry.
const (
	TypeEd25519 byte = 0x01
	TypeMLDSA44 byte = 0x06
)

// MaxNameLen bounds operator (key) names; cosignature/v1 allows 255 bytes.
const MaxNameLen = 64

const privatePrefix = "PRIVATE+KEY+"

// GenerateKey makes an operator key named name from rand (crypto/rand if
// nil) and returns the private key string skey, which must be kept secret,
// and the verifier key string vkey to register in the Policy.
func GenerateKey(rand io.Reader, name string, typ KeyType) (skey, vkey string, err error) {
	if !validName(name) {
		return "", "", fmt.Errorf("%w: name %q: want 1-%d bytes of UTF-8 without spaces or '+'", ErrInvalidKey, name, MaxNameLen)
	}
	if rand == nil {
		rand = cryptoRand
	}
	switch typ {
	case KeyEd25519:
		skey, vkey, err = note.GenerateKey(rand, name)
		if err != nil {
			return "", "", fmt.Errorf("quorum: generating Ed25519 key: %w", err)
		}
		return skey, vkey, nil
	case KeyMLDSA44:
		return generateMLDSA(rand, name)
	}
	return "", "", fmt.Errorf("%w %q (want %s or %s)", ErrUnsupportedKey, typ, KeyEd25519, KeyMLDSA44)
}

// generateMLDSA writes the seed in the form of formats' GenerateMLDSAKey
// and checks that formats derives the same public key (its key hash).
func generateMLDSA(rand io.Reader, name string) (skey, vkey string, err error) {
	var seed [mldsa44.SeedSize]byte
	defer clear(seed[:])
	if _, err := io.ReadFull(rand, seed[:]); err != nil {
		return "", "", fmt.Errorf("quorum: generating ML-DSA-44 key: %w", err)
	}
	pk, sk := mldsa44.NewKeyFromSeed(&seed)
	*sk = mldsa44.PrivateKey{}
	pub := append([]byte{TypeMLDSA44}, pk.Bytes()...)
	hash := keyHash(name, pub)
	priv := append([]byte{TypeMLDSA44}, seed[:]...)
	defer clear(priv)
	skey = fmt.Sprintf("%s%s+%08x+%s", privatePrefix, name, hash, base64.StdEncoding.EncodeToString(priv))
	vkey = fmt.Sprintf("%s+%08x+%s", name, hash, base64.StdEncoding.EncodeToString(pub))
	if _, err := NewSigner(skey); err != nil {
		return "", "", fmt.Errorf("quorum: generated ML-DSA-44 key does not load: %w", err)
	}
	return skey, vkey, nil
}

// NewSigner returns the note.Signer for a private key string made by
// GenerateKey, note.GenerateKey or formats' GenerateMLDSAKey. The signer
// keeps the key in memory. Errors wrap ErrInvalidKey or ErrUnsupportedKey
// and never include the key.
func NewSigner(skey string) (note.Signer, error) {
	rest, ok := strings.CutPrefix(skey, privatePrefix)
	if !ok {
		return nil, fmt.Errorf("%w: private key: does not start with %s", ErrInvalidKey, privatePrefix)
	}
	_, hash, key, err := splitKey(rest)
	if err != nil {
		return nil, fmt.Errorf("%w: private key: malformed", ErrInvalidKey)
	}
	defer clear(key)
	var s note.Signer
	switch key[0] {
	case TypeEd25519:
		s, err = note.NewSigner(skey)
	case TypeMLDSA44:
		s, err = tnote.NewMLDSASigner(skey)
	default:
		return nil, fmt.Errorf("%w: private key type %#02x", ErrUnsupportedKey, key[0])
	}
	if err != nil || s.KeyHash() != hash {
		return nil, fmt.Errorf("%w: private key: malformed or its key hash does not match", ErrInvalidKey)
	}
	return s, nil
}

// NewVerifier parses a verifier key string "name+hash+base64(type||key)"
// of type Ed25519 (0x01, checked by x/mod/sumdb/note) or ML-DSA-44 (0x06,
// checked by transparency-dev/formats/note). The hash must match the key.
// Errors wrap ErrInvalidKey or ErrUnsupportedKey.
func NewVerifier(vkey string) (note.Verifier, error) {
	name, hash, key, err := splitKey(vkey)
	if err != nil {
		return nil, err
	}
	var v note.Verifier
	switch key[0] {
	case TypeEd25519:
		v, err = note.NewVerifier(vkey)
	case TypeMLDSA44:
		v, err = tnote.NewMLDSAVerifier(vkey)
	default:
		return nil, fmt.Errorf("%w: key %s: type %#02x", ErrUnsupportedKey, name, key[0])
	}
	if err != nil {
		return nil, fmt.Errorf("%w: key %s: %v", ErrInvalidKey, name, err)
	}
	if v.KeyHash() != hash || v.Name() != name {
		return nil, fmt.Errorf("%w: key %s: hash %08x does not match the key", ErrInvalidKey, name, hash)
	}
	return v, nil
}

// splitKey splits "name+hash+base64(type||key)". Its errors quote the name
// only; callers parsing private keys drop them.
func splitKey(s string) (name string, hash uint32, key []byte, err error) {
	name, s, _ = strings.Cut(s, "+")
	hash16, b64, _ := strings.Cut(s, "+")
	if !validName(name) {
		return "", 0, nil, fmt.Errorf("%w: name %.40q: want 1-%d bytes of UTF-8 without spaces or '+'", ErrInvalidKey, name, MaxNameLen)
	}
	h, err := strconv.ParseUint(hash16, 16, 32)
	if len(hash16) != 8 || err != nil {
		return "", 0, nil, fmt.Errorf("%w: key %s: hash is not 8 hex digits", ErrInvalidKey, name)
	}
	key, err = base64.StdEncoding.DecodeString(b64)
	if err != nil || len(key) < 2 {
		return "", 0, nil, fmt.Errorf("%w: key %s: not base64(type||key)", ErrInvalidKey, name)
	}
	return name, uint32(h), key, nil
}

// validName is x/mod/sumdb/note's rule (non-empty UTF-8 without Unicode
// spaces or '+'), at most MaxNameLen bytes.
func validName(name string) bool {
	return name != "" && len(name) <= MaxNameLen && utf8.ValidString(name) &&
		strings.IndexFunc(name, unicode.IsSpace) < 0 && !strings.Contains(name, "+")
}

// keyHash is the note key hash of Ed25519 and ML-DSA keys.
func keyHash(name string, typedKey []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name + "\n"))
	h.Write(typedKey)
	return binary.BigEndian.Uint32(h.Sum(nil))
}
