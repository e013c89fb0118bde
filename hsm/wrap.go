package hsm

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
)

const (
	gcmIVSize  = 12
	gcmTagSize = 16
	// MaxWrapSize bounds the plaintext of WrapSeal (and so WrapOpen's
	// input): the wrap key protects a few small secrets, not bulk data.
	MaxWrapSize = 1 << 20
)

// Sealed formats of WrapSeal.
//
//	wrap/v1:          iv (12) || ciphertext || tag (16); GCM AAD = aad
//	wrap/vN (N >= 2): "hsw2" || N (4, big endian) || iv || ciphertext || tag;
//	                  GCM AAD = the 8-byte header || aad
//
// Blobs sealed under wrap/v1 keep the format hsmd has always written, so
// every existing blob still opens. The header binds the wrap version into
// the authenticated data.
const (
	wrapMagic      = "hsw2"
	wrapHeaderSize = len(wrapMagic) + 4
)

// wrapHeader returns the header of a blob sealed under wrap/vN, N >= 2.
func wrapHeader(v uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte(wrapMagic), v)
}

// wrapVersion returns the wrap version in the header of sealed, if it has
// one. A wrap/v1 blob whose random IV happens to start with the header
// also parses; WrapOpen then falls back to wrap/v1.
func wrapVersion(sealed []byte) (uint32, bool) {
	if len(sealed) < wrapHeaderSize+gcmIVSize+gcmTagSize || string(sealed[:len(wrapMagic)]) != wrapMagic {
		return 0, false
	}
	v := binary.BigEndian.Uint32(sealed[len(wrapMagic):wrapHeaderSize])
	return v, v >= 2
}

// gcmAAD is the AAD of a blob with header hdr (nil for wrap/v1).
func gcmAAD(hdr, aad []byte) []byte {
	if len(hdr) == 0 {
		return aad
	}
	return append(hdr[:len(hdr):len(hdr)], aad...)
}

// WrapSeal encrypts plaintext with AES-256-GCM inside the HSM under the
// newest loaded wrap key, with a random 12-byte IV drawn here from
// crypto/rand. Under hsmd/wrap/v1 it returns iv || ciphertext || tag;
// under hsmd/wrap/vN, N >= 2, that is preceded by an 8-byte header naming
// N, which is also authenticated. aad must not be empty (SoftHSM needs it,
// and a wrapped secret should always be bound to its context); plaintext is
// at most MaxWrapSize bytes. Safe for concurrent use. Errors:
// ErrKeyNotFound if no wrap key is loaded; retryable ErrBusy/ErrTimeout;
// classified *Error from the module.
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
	v := ks.newest(KindWrap)
	k, ok := ks.get(KindWrap, v)
	if !ok {
		return nil, fmt.Errorf("%w: no key labelled %s/vN", ErrKeyNotFound, labelPrefix+KindWrap)
	}
	var hdr []byte
	if v > 1 {
		hdr = wrapHeader(v)
	}
	out := make([]byte, len(hdr)+gcmIVSize, len(hdr)+gcmIVSize+len(plaintext)+gcmTagSize)
	copy(out, hdr)
	if _, err := rand.Read(out[len(hdr):]); err != nil {
		return nil, fmt.Errorf("hsm: wrap seal: %w", err)
	}
	ct, err := h.gcmSeal(ctx, "wrap seal", k.obj, out[len(hdr):], plaintext, gcmAAD(hdr, aad))
	if err != nil {
		return nil, err
	}
	return append(out, ct...), nil
}

// WrapOpen decrypts the output of WrapSeal with the same aad, under the
// wrap version its header names, or hsmd/wrap/v1 for a blob without one.
// Every authentication or format failure, and a blob whose wrap version is
// no longer on the token, returns exactly ErrWrapOpen, with no detail. A
// failure of the HSM itself (busy, timeout, session lost, token unusable,
// closed) returns an error that wraps both ErrWrapOpen and the cause, so
// IsRetryable still tells whether to retry. Safe for concurrent use.
func (h *HSM) WrapOpen(ctx context.Context, sealed, aad []byte) ([]byte, error) {
	if len(aad) == 0 || len(sealed) < gcmIVSize+gcmTagSize || len(sealed) > wrapHeaderSize+gcmIVSize+MaxWrapSize+gcmTagSize {
		return nil, ErrWrapOpen
	}
	ks, err := h.loadedKeys()
	if err != nil {
		return nil, err
	}
	if v, ok := wrapVersion(sealed); ok {
		if k, ok := ks.get(KindWrap, v); ok {
			body := sealed[wrapHeaderSize:]
			pt, err := h.gcmOpen(ctx, "wrap open", k.obj, body[:gcmIVSize], body[gcmIVSize:], gcmAAD(sealed[:wrapHeaderSize], aad))
			if err == nil || !isAuthFailure(err) {
				return wrapOpenResult(pt, err)
			}
		}
		// Else it may be a wrap/v1 blob whose IV starts like a header.
	}
	k, ok := ks.get(KindWrap, 1)
	if !ok || len(sealed) > gcmIVSize+MaxWrapSize+gcmTagSize {
		return nil, ErrWrapOpen
	}
	return wrapOpenResult(h.gcmOpen(ctx, "wrap open", k.obj, sealed[:gcmIVSize], sealed[gcmIVSize:], aad))
}

// isAuthFailure reports whether err from the module is about the data
// (bad tag, bad length) rather than the HSM.
func isAuthFailure(err error) bool {
	return !IsRetryable(err) && !IsFatal(err) && !errors.Is(err, ErrClosed) && !errors.Is(err, context.Canceled)
}

func wrapOpenResult(pt []byte, err error) ([]byte, error) {
	switch {
	case err == nil:
		return pt, nil
	case !isAuthFailure(err):
		return nil, fmt.Errorf("%w: %w", ErrWrapOpen, err)
	}
	return nil, ErrWrapOpen
}
