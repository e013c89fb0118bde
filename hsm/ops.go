package hsm

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

const (
	gcmIVSize  = 12
	gcmTagSize = 16
	// MaxWrapSize bounds the plaintext of WrapSeal (and so WrapOpen's
	// input): the wrap key protects a few small secrets, not bulk data.
	MaxWrapSize = 1 << 20
	// PRFSize is the output size of PRF.
	PRFSize = 32
)

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
	k, ok := ks.kdk[kdkVersion]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrKeyNotFound, KeyLabel(KindKDK, kdkVersion))
	}
	var out []byte
	err = h.do(ctx, "prf", func(m Module, s pkcs11.SessionHandle) error {
		if err := m.SignInit(s, hmacMech, k); err != nil {
			return err
		}
		mac, err := m.Sign(s, msg)
		if err != nil {
			return err
		}
		if len(mac) != PRFSize {
			return fmt.Errorf("hsm: prf: HMAC output is %d bytes, want %d", len(mac), PRFSize)
		}
		out = mac
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// WrapSeal encrypts plaintext with AES-256-GCM under hsmd/wrap/v1 inside the
// HSM, with a random 12-byte IV drawn here from crypto/rand, and returns
// iv || ciphertext || tag. aad must not be empty (SoftHSM needs it, and a
// wrapped secret should always be bound to its context); plaintext is at
// most MaxWrapSize bytes. Safe for concurrent use.
func (h *HSM) WrapSeal(ctx context.Context, plaintext, aad []byte) ([]byte, error) {
	if len(aad) == 0 {
		return nil, errors.New("hsm: wrap seal: aad must not be empty")
	}
	if len(plaintext) > MaxWrapSize {
		return nil, fmt.Errorf("hsm: wrap seal: plaintext longer than %d bytes", MaxWrapSize)
	}
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	out := make([]byte, gcmIVSize, gcmIVSize+len(plaintext)+gcmTagSize)
	if _, err := rand.Read(out); err != nil {
		return nil, fmt.Errorf("hsm: wrap seal: %w", err)
	}
	var ct []byte
	err = h.do(ctx, "wrap seal", func(m Module, s pkcs11.SessionHandle) error {
		params := pkcs11.NewGCMParams(out[:gcmIVSize], aad, gcmTagSize*8)
		defer params.Free()
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
		if err := m.EncryptInit(s, mech, ks.wrap); err != nil {
			return err
		}
		var err error
		ct, err = m.Encrypt(s, plaintext)
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(ct) != len(plaintext)+gcmTagSize {
		return nil, fmt.Errorf("hsm: wrap seal: ciphertext is %d bytes, want %d", len(ct), len(plaintext)+gcmTagSize)
	}
	return append(out, ct...), nil
}

// WrapOpen decrypts the output of WrapSeal with the same aad. Every
// authentication or format failure returns exactly ErrWrapOpen, with no
// detail. A failure of the HSM itself (busy, timeout, session lost, token
// unusable, closed) returns an error that wraps both ErrWrapOpen and the
// cause, so IsRetryable still tells whether to retry. Safe for concurrent
// use.
func (h *HSM) WrapOpen(ctx context.Context, sealed, aad []byte) ([]byte, error) {
	if len(aad) == 0 || len(sealed) < gcmIVSize+gcmTagSize || len(sealed) > gcmIVSize+MaxWrapSize+gcmTagSize {
		return nil, ErrWrapOpen
	}
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	var pt []byte
	err = h.do(ctx, "wrap open", func(m Module, s pkcs11.SessionHandle) error {
		params := pkcs11.NewGCMParams(sealed[:gcmIVSize], aad, gcmTagSize*8)
		defer params.Free()
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}
		if err := m.DecryptInit(s, mech, ks.wrap); err != nil {
			return err
		}
		var err error
		pt, err = m.Decrypt(s, sealed[gcmIVSize:])
		return err
	})
	switch {
	case err == nil:
		return pt, nil
	case IsRetryable(err) || IsFatal(err) || errors.Is(err, ErrClosed) || errors.Is(err, context.Canceled):
		return nil, fmt.Errorf("%w: %w", ErrWrapOpen, err)
	}
	return nil, ErrWrapOpen
}
