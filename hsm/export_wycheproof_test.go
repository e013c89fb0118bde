package hsm

import (
	"context"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Test-only entry points for the Wycheproof known-answer tests in
// hsm_wycheproof_test.go (package hsm_test). They run this package's own
// AES-GCM and HMAC calls (gcmSeal, gcmOpen and hmacWith, which WrapSeal,
// WrapOpen and PRF use) on keys a test imports with this package's own
// import templates, but of any value and length, and under labels outside
// "hsmd/", so that LoadKeys never picks them up.

// WycheproofImportSecret creates on the token a secret key of kind
// (KindKDK: HMAC-SHA256 generic secret; KindWrap: AES) holding value, with
// the attributes ImportRoots gives such a key, labelled label. The caller
// destroys it with WycheproofDestroy. Serialised with key creation.
func (h *HSM) WycheproofImportSecret(ctx context.Context, kind, label string, value []byte) (pkcs11.ObjectHandle, error) {
	spec, ok := specOf(kind)
	if !ok || spec.pair {
		return 0, fmt.Errorf("hsm: wycheproof: %q is not a secret key kind", kind)
	}
	mat := &RootMaterial{KDK: value, Wrap: value}
	keyCreation.Lock()
	defer keyCreation.Unlock()
	var k madeKey
	err := h.do(ctx, "wycheproof import", func(m Module, s pkcs11.SessionHandle) error {
		return importer(spec, label, mat)(m, s, &k)
	})
	return k.key, err
}

// WycheproofDestroy destroys o.
func (h *HSM) WycheproofDestroy(ctx context.Context, o pkcs11.ObjectHandle) error {
	return h.destroy(ctx, anyGen, []pkcs11.ObjectHandle{o})
}

// WycheproofGCMSeal is gcmSeal: AES-GCM encryption with k in the HSM,
// returning ciphertext || tag.
func (h *HSM) WycheproofGCMSeal(ctx context.Context, k pkcs11.ObjectHandle, iv, plaintext, aad []byte) ([]byte, error) {
	return h.gcmSeal(ctx, "wycheproof gcm seal", objRef{k, anyGen}, iv, plaintext, aad)
}

// WycheproofGCMOpen is gcmOpen: AES-GCM decryption of ciphertext || tag
// with k in the HSM.
func (h *HSM) WycheproofGCMOpen(ctx context.Context, k pkcs11.ObjectHandle, iv, ct, aad []byte) ([]byte, error) {
	return h.gcmOpen(ctx, "wycheproof gcm open", objRef{k, anyGen}, iv, ct, aad)
}

// WycheproofHMAC is hmacWith: HMAC-SHA256 with the generic secret k in
// the HSM.
func (h *HSM) WycheproofHMAC(ctx context.Context, k pkcs11.ObjectHandle, msg []byte) ([]byte, error) {
	return h.hmacWith(ctx, "wycheproof hmac", objRef{k, anyGen}, msg)
}

// WycheproofIsAuthFailure is isAuthFailure: err is about the data, not
// the HSM (WrapOpen turns such errors into a bare ErrWrapOpen).
func WycheproofIsAuthFailure(err error) bool { return isAuthFailure(err) }
