package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"

	"github.com/miekg/pkcs11"
)

// Messages of the self-checks run on new root keys.
var (
	selfCheckMsgA = []byte("hsmd/self-check/a")
	selfCheckMsgB = []byte("hsmd/self-check/b")
	selfCheckAAD  = []byte("hsmd/self-check")
)

// checkRoot exercises a root key just made. With mat (import) it also
// proves that the HSM holds mat's key: known-answer HMAC, an AES-GCM
// ciphertext that opens in software, a signature that verifies under the
// public key derived from mat.
func (h *HSM) checkRoot(ctx context.Context, op string, spec kindSpec, label string, k madeKey, mat *RootMaterial) error {
	switch spec.kind {
	case KindKDK:
		return h.checkKDK(ctx, op, objRef{k.key, k.gen}, mat)
	case KindWrap:
		return h.checkWrapKey(ctx, op, objRef{k.key, k.gen}, mat)
	}
	return h.checkPair(ctx, op, spec, label, k, mat)
}

func (h *HSM) checkKDK(ctx context.Context, op string, k objRef, mat *RootMaterial) error {
	a1, err := h.hmacWith(ctx, op, k, selfCheckMsgA)
	if err != nil {
		return err
	}
	a2, err := h.hmacWith(ctx, op, k, selfCheckMsgA)
	if err != nil {
		return err
	}
	b, err := h.hmacWith(ctx, op, k, selfCheckMsgB)
	if err != nil {
		return err
	}
	if !bytes.Equal(a1, a2) || bytes.Equal(a1, b) {
		return errors.New("HMAC outputs are inconsistent")
	}
	if mat != nil {
		mac := hmac.New(sha256.New, mat.KDK)
		mac.Write(selfCheckMsgA)
		if !hmac.Equal(a1, mac.Sum(nil)) {
			return errors.New("the HSM's HMAC differs from the known answer computed from the material")
		}
	}
	return nil
}

func (h *HSM) checkWrapKey(ctx context.Context, op string, k objRef, mat *RootMaterial) error {
	msg := []byte("hsmd self-check plaintext")
	iv := make([]byte, gcmIVSize)
	if _, err := rand.Read(iv); err != nil {
		return err
	}
	ct, err := h.gcmSeal(ctx, op, k, iv, msg, selfCheckAAD)
	if err != nil {
		return err
	}
	got, err := h.gcmOpen(ctx, op, k, iv, ct, selfCheckAAD)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("AES-GCM round trip returned other plaintext")
	}
	bad := bytes.Clone(ct)
	bad[len(bad)-1] ^= 1
	if _, err := h.gcmOpen(ctx, op, k, iv, bad, selfCheckAAD); err == nil {
		return errors.New("AES-GCM accepted a modified tag")
	} else if !isAuthFailure(err) {
		return err
	}
	if mat != nil {
		block, err := aes.NewCipher(mat.Wrap)
		if err != nil {
			return err
		}
		gcm, err := cipher.NewGCM(block)
		if err != nil {
			return err
		}
		if got, err := gcm.Open(nil, iv, ct, selfCheckAAD); err != nil || !bytes.Equal(got, msg) {
			return errors.New("the HSM's AES-GCM ciphertext does not open with the material's key")
		}
	}
	return nil
}

// checkPair signs with the private key in the HSM and verifies under the
// public key read from the token, or, with mat, under the one derived from
// mat (which the token's public object must then hold).
func (h *HSM) checkPair(ctx context.Context, op string, spec kindSpec, label string, k madeKey, mat *RootMaterial) error {
	var pub crypto.PublicKey
	err := h.doAt(ctx, op, k.gen, func(m Module, s pkcs11.SessionHandle) error {
		var err error
		pub, err = readPublic(m, s, spec, label, k.pub)
		return err
	})
	if err != nil {
		return err
	}
	if mat != nil {
		want, err := materialPublic(spec, mat)
		if err != nil {
			return err
		}
		if !samePublic(want, pub) {
			return errors.New("the public key on the token is not the material's")
		}
		pub = want
	}
	msg := make([]byte, 32)
	if _, err := rand.Read(msg); err != nil {
		return err
	}
	if spec.kind == KindSigEd25519 {
		sig, err := h.signWith(ctx, op, objRef{k.key, k.gen}, []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmEdDSA, nil)}, msg)
		if err != nil {
			return err
		}
		if !ed25519.Verify(pub.(ed25519.PublicKey), msg, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
		return nil
	}
	digest := sha256.Sum256(msg)
	raw, err := h.signWith(ctx, op, objRef{k.key, k.gen}, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, digest[:])
	if err != nil {
		return err
	}
	sig, err := rawToDER(raw)
	if err != nil {
		return err
	}
	if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest[:], sig) {
		return errors.New("ECDSA signature does not verify")
	}
	return nil
}

// materialPublic derives the public key of the signing kind spec from mat.
func materialPublic(spec kindSpec, mat *RootMaterial) (crypto.PublicKey, error) {
	if spec.kind == KindSigEd25519 {
		return mat.ed25519Public(), nil
	}
	return mat.p256Public()
}
