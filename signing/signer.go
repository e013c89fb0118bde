// Package signing signs C2SP tlog-checkpoints as signed notes
// (golang.org/x/mod/sumdb/note format).
//
// A NoteSigner wraps any crypto.Signer (in hsmd, an HSM-held key; the package
// never imports the HSM backend) whose public key is Ed25519 (note signature
// type 0x01, verified by golang.org/x/mod/sumdb/note) or ECDSA P-256 (type
// 0x02, verified by github.com/transparency-dev/formats/note). An MLDSASigner
// holds an ML-DSA-44 private key in host memory and makes C2SP
// cosignature/v1 signatures (type 0x06). Verify demands a valid signature
// from every given verifier, so a caller can require classical AND
// post-quantum signatures on one checkpoint.
//
// Erasure of key material in host memory (MLDSASigner.Destroy) is best
// effort: the Go runtime may have copied it.
package signing

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/mod/sumdb/note"
)

// Note signature types (the first byte of a verifier key), from the C2SP
// signed-note signature type registry.
const (
	TypeEd25519     byte = 0x01
	TypeECDSAP256   byte = 0x02
	TypeMLDSA44Cosi byte = 0x06
)

var (
	// ErrUnsupportedKey: the signer's public key is not Ed25519 or ECDSA P-256.
	ErrUnsupportedKey = errors.New("signing: unsupported key type")
	// ErrInvalidName: a key name is empty, not UTF-8, or holds a space or '+'.
	ErrInvalidName = errors.New("signing: invalid key name")
	// ErrBadSignature: the underlying signer returned a signature that does
	// not verify under its own public key (a fault, or the wrong key).
	ErrBadSignature = errors.New("signing: signer produced an invalid signature")
)

// contextSigner is the optional ability of a crypto.Signer (such as hsmd's
// HSM signer) to bound one signing call with a context.
type contextSigner interface {
	SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error)
}

// NoteSigner is a note.Signer over a crypto.Signer. It is safe for
// concurrent use if the crypto.Signer is.
type NoteSigner struct {
	name  string
	s     crypto.Signer
	typ   byte
	hash  uint32
	vkey  string
	edPub ed25519.PublicKey
	ecPub *ecdsa.PublicKey
}

var _ note.Signer = (*NoteSigner)(nil)

// NewNoteSigner returns a note signer named name over s. s.Public() must be
// an ed25519.PublicKey (s.Sign then receives the message and
// crypto.Hash(0)) or an *ecdsa.PublicKey on P-256 (s.Sign receives the
// SHA-256 digest of the message and crypto.SHA256, and must return an ASN.1
// DER signature, as crypto/ecdsa does). Other keys give ErrUnsupportedKey.
func NewNoteSigner(name string, s crypto.Signer) (*NoteSigner, error) {
	if !isValidName(name) {
		return nil, fmt.Errorf("%w %q", ErrInvalidName, name)
	}
	if s == nil {
		return nil, fmt.Errorf("%w: nil signer", ErrUnsupportedKey)
	}
	ns := &NoteSigner{name: name, s: s}
	switch pub := s.Public().(type) {
	case ed25519.PublicKey:
		if len(pub) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("%w: Ed25519 public key of %d bytes", ErrUnsupportedKey, len(pub))
		}
		ns.typ, ns.edPub = TypeEd25519, pub
		// Same key hash and encoding as golang.org/x/mod/sumdb/note.
		vkey, err := note.NewEd25519VerifierKey(name, pub)
		if err != nil {
			return nil, fmt.Errorf("signing: %w", err)
		}
		ns.vkey = vkey
		ns.hash = keyHash(name, append([]byte{TypeEd25519}, pub...))
	case *ecdsa.PublicKey:
		if pub == nil || pub.Curve != elliptic.P256() {
			return nil, fmt.Errorf("%w: ECDSA key not on P-256", ErrUnsupportedKey)
		}
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrUnsupportedKey, err)
		}
		ns.typ, ns.ecPub = TypeECDSAP256, pub
		// transparency-dev/formats/note hashes the SPKI DER alone (no name).
		sum := sha256.Sum256(der)
		ns.hash = binary.BigEndian.Uint32(sum[:])
		ns.vkey = verifierKey(name, ns.hash, TypeECDSAP256, der)
	default:
		return nil, fmt.Errorf("%w %T", ErrUnsupportedKey, pub)
	}
	return ns, nil
}

// Name returns the key name.
func (s *NoteSigner) Name() string { return s.name }

// KeyHash returns the key hash the verifiers compute.
func (s *NoteSigner) KeyHash() uint32 { return s.hash }

// Type returns the note signature type: TypeEd25519 or TypeECDSAP256.
func (s *NoteSigner) Type() byte { return s.typ }

// VerifierKey returns the verifier key text "name+hash+base64(type||key)",
// where key is the raw 32-byte Ed25519 key or the P-256 SubjectPublicKeyInfo
// DER. note.NewVerifier accepts the Ed25519 form and
// transparency-dev/formats/note.NewVerifier both forms.
func (s *NoteSigner) VerifierKey() string { return s.vkey }

// Sign signs msg (the note text). note.Signer's Sign takes no context: the
// call uses context.Background, so the crypto.Signer's own deadline (hsmd's
// HSM CallTimeout) bounds it. Use SignContext or WithContext for a tighter
// bound. Each signature is checked against the public key before it is
// returned, so a faulty signer yields ErrBadSignature, never a bad note.
func (s *NoteSigner) Sign(msg []byte) ([]byte, error) {
	return s.SignContext(context.Background(), msg)
}

// SignContext is Sign bounded by ctx if the crypto.Signer has a
// SignContext(ctx, digest, opts) method; otherwise ctx is checked only
// before the call.
func (s *NoteSigner) SignContext(ctx context.Context, msg []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("signing: %w", err)
	}
	var digest []byte
	var opts crypto.SignerOpts
	switch s.typ {
	case TypeEd25519:
		digest, opts = msg, crypto.Hash(0)
	default:
		sum := sha256.Sum256(msg)
		digest, opts = sum[:], crypto.SHA256
	}
	var sig []byte
	var err error
	if cs, ok := s.s.(contextSigner); ok {
		sig, err = cs.SignContext(ctx, digest, opts)
	} else {
		sig, err = s.s.Sign(rand.Reader, digest, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("signing: %s: %w", s.name, err)
	}
	var ok bool
	switch s.typ {
	case TypeEd25519:
		ok = len(sig) == ed25519.SignatureSize && ed25519.Verify(s.edPub, msg, sig)
	default:
		ok = ecdsa.VerifyASN1(s.ecPub, digest, sig)
	}
	if !ok {
		return nil, fmt.Errorf("%w (key %s)", ErrBadSignature, s.name)
	}
	return sig, nil
}

// WithContext returns a note.Signer, with the same name and key hash, whose
// Sign calls s.SignContext(ctx, msg); pass it to note.Sign.
func (s *NoteSigner) WithContext(ctx context.Context) note.Signer {
	return ctxSigner{s: s, ctx: ctx}
}

type ctxSigner struct {
	s   *NoteSigner
	ctx context.Context
}

func (c ctxSigner) Name() string                    { return c.s.name }
func (c ctxSigner) KeyHash() uint32                 { return c.s.hash }
func (c ctxSigner) Sign(msg []byte) ([]byte, error) { return c.s.SignContext(c.ctx, msg) }

// isValidName matches golang.org/x/mod/sumdb/note: non-empty UTF-8 without
// Unicode spaces or '+'.
func isValidName(name string) bool {
	return name != "" && utf8.ValidString(name) && strings.IndexFunc(name, unicode.IsSpace) < 0 && !strings.Contains(name, "+")
}

// keyHash is the note key hash for Ed25519 and ML-DSA keys: the first four
// bytes of SHA-256(name || "\n" || type || key), big-endian.
func keyHash(name string, typedKey []byte) uint32 {
	h := sha256.New()
	h.Write([]byte(name))
	h.Write([]byte("\n"))
	h.Write(typedKey)
	return binary.BigEndian.Uint32(h.Sum(nil))
}

func verifierKey(name string, hash uint32, typ byte, key []byte) string {
	return fmt.Sprintf("%s+%08x+%s", name, hash, base64.StdEncoding.EncodeToString(append([]byte{typ}, key...)))
}
