package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
)

// keyCreation serialises key creation in the process: SoftHSM 2.6.1 fails
// now and then when keys are generated concurrently.
var keyCreation sync.Mutex

type keyGen func(m Module, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error)

// InitKeys creates the root keys on a token that has no hsmd key yet
// (`hsmd init`): hsmd/kdk/v1 (HMAC-SHA256 generic secret, 32 bytes),
// hsmd/wrap/v1 (AES-256), hsmd/sig-p256/v1 (ECDSA P-256) and
// hsmd/sig-ed25519/v1 (Ed25519), all generated inside the HSM as
// persistent, private, sensitive, non-extractable keys. It then loads them
// and checks each (HMAC consistency, AES-GCM round trip, sign and verify
// with the public key read from the token).
//
// If any object labelled "hsmd/..." exists it returns ErrKeysExist and
// changes nothing. If creation or a check fails it destroys the keys it
// created (best effort) and returns the error. Key creation is serialised
// within the process. On success the keys are loaded as by LoadKeys.
func (h *HSM) InitKeys(ctx context.Context) error {
	keyCreation.Lock()
	defer keyCreation.Unlock()
	if err := h.checkNoKeys(ctx); err != nil {
		return err
	}
	created, err := h.createKeys(ctx)
	if err == nil {
		err = h.LoadKeys(ctx)
	}
	if err == nil {
		err = h.selfCheck(ctx)
	}
	if err != nil {
		h.keys.Store(nil)
		if derr := h.destroy(ctx, created); derr != nil {
			return fmt.Errorf("%w; destroying the %d key objects created also failed: %w", err, len(created), derr)
		}
		return fmt.Errorf("%w (the key objects created were destroyed)", err)
	}
	return nil
}

// checkNoKeys fails with ErrKeysExist if any object has an hsmd label.
func (h *HSM) checkNoKeys(ctx context.Context) error {
	var found []string
	err := h.do(ctx, "init keys", func(m Module, s pkcs11.SessionHandle) error {
		hs, err := findObjects(m, s, nil)
		if err != nil {
			return err
		}
		for _, o := range hs {
			label, err := objectLabel(m, s, o)
			if err != nil {
				return err
			}
			if strings.HasPrefix(label, labelPrefix) {
				found = append(found, label)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(found) > 0 {
		sort.Strings(found)
		return fmt.Errorf("%w: found %s", ErrKeysExist, strings.Join(found, ", "))
	}
	return nil
}

// createKeys generates the root keys one by one and returns the handles of
// those created, also on error. A generation still running at its deadline
// is not known here; its key then stays on the token.
func (h *HSM) createKeys(ctx context.Context) ([]pkcs11.ObjectHandle, error) {
	var created []pkcs11.ObjectHandle
	for _, gen := range []keyGen{genKDK, genWrap, genP256, genEd25519} {
		var hs []pkcs11.ObjectHandle
		err := h.do(ctx, "init keys", func(m Module, s pkcs11.SessionHandle) error {
			var err error
			hs, err = gen(m, s)
			return err
		})
		if err != nil {
			return created, err
		}
		created = append(created, hs...)
	}
	return created, nil
}

func genKDK(m Module, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)}
	o, err := m.GenerateKey(s, mech, kdkTemplate(LabelKDKv1))
	if err != nil {
		return nil, fmt.Errorf("generating %s: %w", LabelKDKv1, err)
	}
	return []pkcs11.ObjectHandle{o}, nil
}

func genWrap(m Module, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	o, err := m.GenerateKey(s, mech, wrapTemplate(LabelWrapv1))
	if err != nil {
		return nil, fmt.Errorf("generating %s: %w", LabelWrapv1, err)
	}
	return []pkcs11.ObjectHandle{o}, nil
}

func genP256(m Module, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	return genPair(m, s, LabelSigP256v1, pkcs11.CKK_EC, pkcs11.CKM_EC_KEY_PAIR_GEN, oidP256)
}

func genEd25519(m Module, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	return genPair(m, s, LabelSigEd25519v1, ckkECEdwards, ckmECEdwardsKeyPairGen, oidEd25519)
}

func genPair(m Module, s pkcs11.SessionHandle, label string, keyType, mechType uint, curve []byte) ([]pkcs11.ObjectHandle, error) {
	pubT, privT := keyPairTemplates(label, keyType, curve)
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(mechType, nil)}
	pub, priv, err := m.GenerateKeyPair(s, mech, pubT, privT)
	if err != nil {
		return nil, fmt.Errorf("generating %s: %w", label, err)
	}
	return []pkcs11.ObjectHandle{pub, priv}, nil
}

// destroy removes the given objects, continuing past failures.
func (h *HSM) destroy(ctx context.Context, objs []pkcs11.ObjectHandle) error {
	var errs []error
	for _, o := range objs {
		errs = append(errs, h.do(ctx, "destroy key", func(m Module, s pkcs11.SessionHandle) error {
			return m.DestroyObject(s, o)
		}))
	}
	return errors.Join(errs...)
}

// selfCheck exercises every loaded root key once.
func (h *HSM) selfCheck(ctx context.Context) error {
	if err := h.checkPRF(ctx); err != nil {
		return fmt.Errorf("hsm: init keys: self-check of %s: %w", LabelKDKv1, err)
	}
	if err := h.checkWrap(ctx); err != nil {
		return fmt.Errorf("hsm: init keys: self-check of %s: %w", LabelWrapv1, err)
	}
	if err := h.checkSigner(ctx, ECDSAP256); err != nil {
		return fmt.Errorf("hsm: init keys: self-check of %s: %w", LabelSigP256v1, err)
	}
	if err := h.checkSigner(ctx, Ed25519); err != nil {
		return fmt.Errorf("hsm: init keys: self-check of %s: %w", LabelSigEd25519v1, err)
	}
	return nil
}

func (h *HSM) checkPRF(ctx context.Context) error {
	a1, err := h.PRF(ctx, 1, []byte("hsmd/self-check/a"))
	if err != nil {
		return err
	}
	a2, err := h.PRF(ctx, 1, []byte("hsmd/self-check/a"))
	if err != nil {
		return err
	}
	b, err := h.PRF(ctx, 1, []byte("hsmd/self-check/b"))
	if err != nil {
		return err
	}
	if len(a1) != 32 || !bytes.Equal(a1, a2) || bytes.Equal(a1, b) {
		return errors.New("HMAC outputs are inconsistent")
	}
	return nil
}

func (h *HSM) checkWrap(ctx context.Context) error {
	msg, aad := []byte("hsmd self-check plaintext"), []byte("hsmd/self-check")
	sealed, err := h.WrapSeal(ctx, msg, aad)
	if err != nil {
		return err
	}
	got, err := h.WrapOpen(ctx, sealed, aad)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("AES-GCM round trip returned other plaintext")
	}
	sealed[len(sealed)-1] ^= 1
	if _, err := h.WrapOpen(ctx, sealed, aad); !errors.Is(err, ErrWrapOpen) {
		return fmt.Errorf("AES-GCM accepted a modified tag (err %v)", err)
	}
	return nil
}

func (h *HSM) checkSigner(ctx context.Context, alg SignAlg) error {
	sg, err := h.Signer(ctx, alg)
	if err != nil {
		return err
	}
	msg := make([]byte, 32)
	if _, err := rand.Read(msg); err != nil {
		return err
	}
	switch pub := sg.Public().(type) {
	case *ecdsa.PublicKey:
		digest := sha256.Sum256(msg)
		sig, err := sg.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil {
			return err
		}
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			return errors.New("ECDSA signature does not verify")
		}
	case ed25519.PublicKey:
		sig, err := sg.Sign(rand.Reader, msg, crypto.Hash(0))
		if err != nil {
			return err
		}
		if !ed25519.Verify(pub, msg, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
	default:
		return fmt.Errorf("unexpected public key type %T", pub)
	}
	return nil
}
