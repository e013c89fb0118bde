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

// SignAlg names an HSM signing key.
type SignAlg int

const (
	// ECDSAP256 is hsmd/sig-p256/v1: Sign takes a SHA-256 digest
	// (opts.HashFunc() == crypto.SHA256) and returns an ASN.1 DER signature.
	ECDSAP256 SignAlg = iota + 1
	// Ed25519 is hsmd/sig-ed25519/v1: Sign takes the message itself
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

// Signer returns a crypto.Signer for the loaded signing key of alg. Its
// Public returns *ecdsa.PublicKey or ed25519.PublicKey (read from the token
// by LoadKeys). Sign ignores its rand argument (the HSM draws its own
// randomness), runs under Config.CallTimeout, and may be called
// concurrently. The signer is valid until the HSM is closed. Errors:
// ErrKeyNotFound if keys are not loaded; an error for an unknown alg.
func (h *HSM) Signer(ctx context.Context, alg SignAlg) (crypto.Signer, error) {
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	switch alg {
	case ECDSAP256:
		return &signer{h: h, alg: alg, key: ks.p256, pub: ks.p256Pub}, nil
	case Ed25519:
		return &signer{h: h, alg: alg, key: ks.ed, pub: ks.edPub}, nil
	}
	return nil, fmt.Errorf("hsm: signer: unknown algorithm %v", alg)
}

type signer struct {
	h   *HSM
	alg SignAlg
	key pkcs11.ObjectHandle
	pub crypto.PublicKey
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
	var sig []byte
	err = s.h.do(ctx, "sign", func(m Module, sh pkcs11.SessionHandle) error {
		if err := m.SignInit(sh, mech, s.key); err != nil {
			return err
		}
		var err error
		sig, err = m.Sign(sh, digest)
		return err
	})
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

// rawToDER converts a PKCS#11 ECDSA signature r || s to ASN.1 DER.
func rawToDER(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 {
		return nil, fmt.Errorf("hsm: sign: malformed ECDSA signature of %d bytes", len(raw))
	}
	n := len(raw) / 2
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:]),
	})
}
