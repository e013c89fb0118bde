package hsm

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/miekg/pkcs11"
)

// SignAlg names an HSM signing key kind.
type SignAlg int

const (
	// ECDSAP256 is hsmd/sig-p256/vN: Sign takes a SHA-256 digest
	// (opts.HashFunc() == crypto.SHA256) and returns an ASN.1 DER signature.
	ECDSAP256 SignAlg = iota + 1
	// Ed25519 is hsmd/sig-ed25519/vN: Sign takes the message itself
	// (opts.HashFunc() == 0, no context) and returns 64 bytes.
	Ed25519
)

func (a SignAlg) String() string {
	switch a {
	case ECDSAP256:
		return "ECDSA-P256"
	case Ed25519:
		return "Ed25519"
	}
	return fmt.Sprintf("SignAlg(%d)", int(a))
}

// kind returns the key kind of a.
func (a SignAlg) kind() (string, bool) {
	switch a {
	case ECDSAP256:
		return KindSigP256, true
	case Ed25519:
		return KindSigEd25519, true
	}
	return "", false
}

// Signer returns a crypto.Signer for the newest loaded version of the
// signing key of alg (see SignerVersion). Errors: ErrKeyNotFound if keys
// are not loaded or the kind has no key; an error for an unknown alg.
func (h *HSM) Signer(ctx context.Context, alg SignAlg) (crypto.Signer, error) {
	kind, ok := alg.kind()
	if !ok {
		return nil, fmt.Errorf("hsm: signer: unknown algorithm %v", alg)
	}
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	v := ks.newest(kind)
	if v == 0 {
		return nil, fmt.Errorf("%w: no key labelled %s/vN", ErrKeyNotFound, labelPrefix+kind)
	}
	return h.SignerVersion(ctx, alg, v)
}

// SignerVersion returns a crypto.Signer for version of the signing key of
// alg. Its Public returns *ecdsa.PublicKey or ed25519.PublicKey (read from
// the token when the keys were loaded). Sign ignores its rand argument (the
// HSM draws its own randomness), runs under Config.CallTimeout, and may be
// called concurrently. The signer stays on this version when newer ones
// are added; once the version is destroyed (DestroyRoot) Sign fails with
// ErrKeyNotFound. The signer is valid until the HSM is closed. Errors:
// ErrKeyNotFound if keys are not loaded or the version is not; an error
// for an unknown alg.
func (h *HSM) SignerVersion(_ context.Context, alg SignAlg, version uint32) (crypto.Signer, error) {
	kind, ok := alg.kind()
	if !ok {
		return nil, fmt.Errorf("hsm: signer: unknown algorithm %v", alg)
	}
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	k, ok := ks.get(kind, version)
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrKeyNotFound, KeyLabel(kind, version))
	}
	return &signer{h: h, alg: alg, kind: kind, version: version, pub: k.pub}, nil
}

type signer struct {
	h       *HSM
	alg     SignAlg
	kind    string
	version uint32
	pub     crypto.PublicKey
}

func (s *signer) Public() crypto.PublicKey { return s.pub }

// Sign implements crypto.Signer with a background context.
func (s *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.SignContext(context.Background(), digest, opts)
}

// SignContext is Sign with a context bounding the HSM call.
func (s *signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	mech, err := s.check(digest, opts)
	if err != nil {
		return nil, err
	}
	k, err := s.key()
	if err != nil {
		return nil, err
	}
	sig, err := s.h.signWith(ctx, "sign", k, mech, digest)
	if err != nil {
		return nil, err
	}
	if s.alg == Ed25519 {
		if len(sig) != ed25519.SignatureSize {
			return nil, fmt.Errorf("hsm: sign: Ed25519 signature is %d bytes", len(sig))
		}
		return sig, nil
	}
	return rawToDER(sig)
}

// key returns the handle of the signer's key in the loaded set, so that a
// key destroyed or replaced since gives ErrKeyNotFound, never a stale
// handle.
func (s *signer) key() (objRef, error) {
	ks, err := s.h.loadedKeys()
	if err != nil {
		return objRef{}, err
	}
	k, ok := ks.get(s.kind, s.version)
	if !ok || !samePublic(k.pub, s.pub) {
		return objRef{}, fmt.Errorf("%w: %s is no longer loaded (destroyed?)", ErrKeyNotFound, KeyLabel(s.kind, s.version))
	}
	return k.obj, nil
}

// samePublic reports whether a and b are the same public key.
func samePublic(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// check validates the request and returns the mechanism.
func (s *signer) check(digest []byte, opts crypto.SignerOpts) ([]*pkcs11.Mechanism, error) {
	var hf crypto.Hash
	if opts != nil {
		hf = opts.HashFunc()
	}
	switch s.alg {
	case ECDSAP256:
		if hf != crypto.SHA256 || len(digest) != 32 {
			return nil, errors.New("hsm: sign: ECDSA P-256 signs a SHA-256 digest (opts.HashFunc() must be crypto.SHA256)")
		}
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, nil
	default:
		if hf != 0 {
			return nil, errors.New("hsm: sign: Ed25519 signs the message itself (opts.HashFunc() must be 0)")
		}
		if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
			return nil, errors.New("hsm: sign: Ed25519 contexts are not supported")
		}
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmEdDSA, nil)}, nil
	}
}

// rawToDER converts a PKCS#11 ECDSA P-256 signature r || s (32 bytes
// each, as CKM_ECDSA returns it for hsmd's only curve) to ASN.1 DER. Any
// other length is refused.
func rawToDER(raw []byte) ([]byte, error) {
	if len(raw) != 64 {
		return nil, fmt.Errorf("hsm: sign: malformed ECDSA P-256 signature of %d bytes (want 64)", len(raw))
	}
	n := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:]),
	})
}
