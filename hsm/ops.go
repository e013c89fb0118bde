package hsm

import (
	"context"
	"fmt"

	"github.com/miekg/pkcs11"
)

// PRFSize is the output size of PRF.
const PRFSize = 32

// hmacMech is read-only and shared by all PRF calls.
var hmacMech = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_HMAC, nil)}

// PRF returns HMAC-SHA256(kdk vN, msg), computed inside the HSM: 32 bytes.
// It implements envelope.Deriver. Safe for concurrent use; it holds one
// pooled session for one C_SignInit/C_Sign pair. Errors: ErrKeyNotFound for
// an unknown kdkVersion (or keys not loaded); retryable ErrBusy/ErrTimeout;
// classified *Error from the module.
func (h *HSM) PRF(ctx context.Context, kdkVersion uint32, msg []byte) ([]byte, error) {
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	k, ok := ks.get(KindKDK, kdkVersion)
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrKeyNotFound, KeyLabel(KindKDK, kdkVersion))
	}
	return h.hmacWith(ctx, "prf", k.obj, msg)
}

// hmacWith computes HMAC-SHA256 with the generic secret k in the HSM.
func (h *HSM) hmacWith(ctx context.Context, op string, k objRef, msg []byte) ([]byte, error) {
	var out []byte
	err := h.doAt(ctx, op, k.gen, func(m Module, s pkcs11.SessionHandle) error {
		var err error
		out, err = hmacOn(m, s, op, k.h, msg)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// hmacOn computes HMAC-SHA256 with the generic secret k on session s.
func hmacOn(m Module, s pkcs11.SessionHandle, op string, k pkcs11.ObjectHandle, msg []byte) ([]byte, error) {
	if err := m.SignInit(s, hmacMech, k); err != nil {
		return nil, err
	}
	mac, err := m.Sign(s, msg)
	if err != nil {
		return nil, err
	}
	if len(mac) != PRFSize {
		return nil, fmt.Errorf("hsm: %s: HMAC output is %d bytes, want %d", op, len(mac), PRFSize)
	}
	return mac, nil
}

// signWith signs msg with the private key k using mech in the HSM and
// returns the raw PKCS#11 signature.
func (h *HSM) signWith(ctx context.Context, op string, k objRef, mech []*pkcs11.Mechanism, msg []byte) ([]byte, error) {
	var sig []byte
	err := h.doAt(ctx, op, k.gen, func(m Module, s pkcs11.SessionHandle) error {
		var err error
		sig, err = signOn(m, s, k.h, mech, msg)
		return err
	})
	return sig, err
}

// signOn signs msg with the private key k using mech on session s.
func signOn(m Module, s pkcs11.SessionHandle, k pkcs11.ObjectHandle, mech []*pkcs11.Mechanism, msg []byte) ([]byte, error) {
	if err := m.SignInit(s, mech, k); err != nil {
		return nil, err
	}
	return m.Sign(s, msg)
}

// gcmSeal encrypts plaintext with the AES key k under AES-GCM with iv and
// aad in the HSM and returns ciphertext || tag.
func (h *HSM) gcmSeal(ctx context.Context, op string, k objRef, iv, plaintext, aad []byte) ([]byte, error) {
	var ct []byte
	err := h.doAt(ctx, op, k.gen, func(m Module, s pkcs11.SessionHandle) error {
		var err error
		ct, err = gcmSealOn(m, s, k.h, iv, plaintext, aad)
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(ct) != len(plaintext)+gcmTagSize {
		return nil, fmt.Errorf("hsm: %s: ciphertext is %d bytes, want %d", op, len(ct), len(plaintext)+gcmTagSize)
	}
	return ct, nil
}

// gcmSealOn is gcmSeal on session s, without the size check.
func gcmSealOn(m Module, s pkcs11.SessionHandle, k pkcs11.ObjectHandle, iv, plaintext, aad []byte) ([]byte, error) {
	params := pkcs11.NewGCMParams(iv, aad, gcmTagSize*8)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if err := m.EncryptInit(s, mech, k); err != nil {
		return nil, err
	}
	return m.Encrypt(s, plaintext)
}

// gcmOpen decrypts ciphertext || tag with the AES key k under AES-GCM with
// iv and aad in the HSM.
func (h *HSM) gcmOpen(ctx context.Context, op string, k objRef, iv, ct, aad []byte) ([]byte, error) {
	var pt []byte
	err := h.doAt(ctx, op, k.gen, func(m Module, s pkcs11.SessionHandle) error {
		var err error
		pt, err = gcmOpenOn(m, s, k.h, iv, ct, aad)
		return err
	})
	return pt, err
}

// gcmOpenOn is gcmOpen on session s.
func gcmOpenOn(m Module, s pkcs11.SessionHandle, k pkcs11.ObjectHandle, iv, ct, aad []byte) ([]byte, error) {
	params := pkcs11.NewGCMParams(iv, aad, gcmTagSize*8)
	defer params.Free()
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
	if err := m.DecryptInit(s, mech, k); err != nil {
		return nil, err
	}
	return m.Decrypt(s, ct)
}
