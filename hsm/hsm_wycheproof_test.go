package hsm_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/wycheproof"
	"github.com/hsmd/hsmd/softhsm"
)

// Known-answer tests of the HSM's AES-GCM and HMAC-SHA256 with Wycheproof
// vectors, on a real SoftHSM token. The vectors' keys are imported as
// token objects with the templates ImportRoots uses (through
// export_wycheproof_test.go), then the package's own gcmSeal, gcmOpen and
// hmacWith run on them; the public entry points (WrapSeal, WrapOpen, PRF)
// run on keys imported with ImportRoots.

// gcmVector reports why v does not fit hsmd's AES-GCM through the HSM
// (AES-256, a 96-bit IV, a 128-bit tag), or "".
func gcmVector(v wycheproof.AEADTest) string {
	switch {
	case len(v.Key) != 32:
		return "key not 256-bit (the wrap key is AES-256)"
	case len(v.IV) != 12:
		return "IV not 96-bit (WrapSeal's IV)"
	case len(v.Tag) != 16:
		return "tag not 128-bit"
	}
	return ""
}

// derivedNegatives are changes to a valid AES-GCM vector after which it
// must not open: the Wycheproof file has no invalid 256-bit, 96-bit IV
// vector with a non-empty AAD.
var derivedNegatives = []struct {
	name string
	mod  func(sealed, aad []byte) ([]byte, []byte)
}{
	{"tag bit flipped", func(s, a []byte) ([]byte, []byte) { s = bytes.Clone(s); s[len(s)-1] ^= 0x01; return s, a }},
	{"first byte flipped", func(s, a []byte) ([]byte, []byte) { s = bytes.Clone(s); s[0] ^= 0x80; return s, a }},
	{"AAD extended", func(s, a []byte) ([]byte, []byte) { return s, append(bytes.Clone(a), 0) }},
	{"AAD byte flipped", func(s, a []byte) ([]byte, []byte) { a = bytes.Clone(a); a[0] ^= 0x01; return s, a }},
}

// derivedCase is the Case of a negative derived from v.
func derivedCase(v wycheproof.AEADTest, name string) wycheproof.Case {
	return wycheproof.Case{TcID: v.TcID, Comment: "derived from a valid vector: " + name, Result: wycheproof.Invalid}
}

// TestWycheproofHSMAESGCM runs the AES-256-GCM vectors (96-bit IV,
// 128-bit tag) through gcmSeal and gcmOpen with the vector's key in the
// HSM: a valid vector must seal to exactly ct || tag and open to msg; an
// invalid one must fail to open with an error isAuthFailure accepts (a
// data error, which WrapOpen reports as ErrWrapOpen; SoftHSM 2.6.1 returns
// CKR_GENERAL_ERROR for a bad tag).
//
// hsmd always passes a non-empty AAD (WrapSeal and WrapOpen refuse an
// empty one), and every invalid vector of these sizes has an empty AAD.
// So the vectors with a non-empty AAD are the test of hsmd's path, with
// negatives derived from each (tag, ciphertext or AAD changed); the
// vectors with an empty AAD, invalid ones included, run in a second count
// that checks SoftHSM itself.
func TestWycheproofHSMAESGCM(t *testing.T) {
	f := wycheproof.Load[wycheproof.AEADGroup](t, "aes_gcm_test.json")
	h := openHSM(t, testConfig(softhsm.NewTestToken(t)), nil)
	ctx := context.Background()
	var st, emptyAAD, derived wycheproof.Stats
	keys := map[string]pkcs11.ObjectHandle{}
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			if why := gcmVector(v); why != "" {
				st.Skip(why)
				continue
			}
			k, ok := keys[string(v.Key)]
			if !ok {
				var err error
				if k, err = h.WycheproofImportSecret(ctx, hsm.KindWrap, fmt.Sprintf("wycheproof/aes-gcm/%d", len(keys)), v.Key); err != nil {
					t.Fatalf("%v: import: %v", v.Case, err)
				}
				keys[string(v.Key)] = k
			}
			sealed := append(bytes.Clone(v.CT), v.Tag...)
			ok, err := hsmGCMCase(t, ctx, h, k, v, sealed, v.AAD)
			if len(v.AAD) == 0 {
				st.Skip("empty AAD (hsmd never sends one; run in the SoftHSM count)")
				emptyAAD.Check(t, v.Case, ok, err)
			} else {
				st.Check(t, v.Case, ok, err)
				for _, n := range derivedNegatives {
					s, a := n.mod(sealed, v.AAD)
					ok, err := hsmGCMCase(t, ctx, h, k, v, s, a)
					derived.Check(t, derivedCase(v, n.name), ok, err)
				}
			}
		}
	}
	for _, k := range keys {
		if err := h.WycheproofDestroy(ctx, k); err != nil {
			t.Errorf("destroy: %v", err)
		}
	}
	st.Report(t, "AES-256-GCM in the HSM (gcmSeal/gcmOpen), non-empty AAD", wycheproof.Valid)
	derived.Report(t, "AES-256-GCM in the HSM, negatives derived from those", wycheproof.Invalid)
	emptyAAD.Report(t, "AES-256-GCM in the HSM, empty AAD (SoftHSM only)", wycheproof.Valid, wycheproof.Invalid)
}

// hsmGCMCase opens sealed (ct || tag) with aad under k and, if v is
// valid and sealed and aad are v's, checks that sealing v's message gives
// sealed. It reports whether sealed was accepted; a rejection that is not
// an authentication failure (an HSM error) fails t.
func hsmGCMCase(t *testing.T, ctx context.Context, h *hsm.HSM, k pkcs11.ObjectHandle, v wycheproof.AEADTest, sealed, aad []byte) (bool, error) {
	pt, err := h.WycheproofGCMOpen(ctx, k, v.IV, sealed, aad)
	if err != nil {
		if !hsm.WycheproofIsAuthFailure(err) {
			t.Errorf("%v: gcmOpen: not an authentication failure: %v", v.Case, err)
		}
		return false, err
	}
	if !bytes.Equal(pt, v.Msg) {
		return false, fmt.Errorf("opened to %x, want %x", pt, v.Msg)
	}
	if v.Result == wycheproof.Valid && bytes.Equal(aad, v.AAD) {
		ct, err := h.WycheproofGCMSeal(ctx, k, v.IV, v.Msg, aad)
		if err != nil {
			return false, fmt.Errorf("seal: %w", err)
		}
		if !bytes.Equal(ct, sealed) {
			return false, fmt.Errorf("sealed to %x, want %x", ct, sealed)
		}
	}
	return true, nil
}

// TestWycheproofHSMWrap runs the AES-256-GCM vectors hsmd's wrap path can
// take (non-empty AAD, 96-bit IV) through WrapOpen and WrapSeal, with the
// vector's key imported by ImportRoots as hsmd/wrap/v1: a wrap/v1 blob is
// iv || ct || tag with the caller's AAD, exactly a vector. WrapOpen must
// return msg, and exactly ErrWrapOpen for each derived negative. WrapSeal
// draws its own IV, so its output is checked by opening it in software
// with the vector's key and AAD. To give each vector's key the version 1,
// the versions rotate: v2 (random) in, v1 destroyed, v1 (the next key)
// imported, v2 destroyed.
func TestWycheproofHSMWrap(t *testing.T) {
	f := wycheproof.Load[wycheproof.AEADGroup](t, "aes_gcm_test.json")
	h := openHSM(t, testConfig(softhsm.NewTestToken(t)), nil)
	ctx := context.Background()
	mat := testMaterial(t, 7)
	var st, derived wycheproof.Stats
	first := true
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			if why := gcmVector(v); why != "" {
				st.Skip(why)
				continue
			}
			if len(v.AAD) == 0 {
				st.Skip("empty AAD (WrapSeal and WrapOpen refuse it)")
				continue
			}
			if !first {
				rotateWrap(t, h, testMaterial(t, 8), 2)
				if err := h.DestroyRoot(ctx, hsm.KindWrap, 1); err != nil {
					t.Fatalf("DestroyRoot v1: %v", err)
				}
			}
			mat.Wrap = bytes.Clone(v.Key)
			rotateWrap(t, h, mat, 1)
			if !first {
				if err := h.DestroyRoot(ctx, hsm.KindWrap, 2); err != nil {
					t.Fatalf("DestroyRoot v2: %v", err)
				}
			}
			first = false
			blob := slices.Concat(v.IV, v.CT, v.Tag)
			ok, err := wrapCase(t, ctx, h, v, blob, v.AAD)
			st.Check(t, v.Case, ok, err)
			for _, n := range derivedNegatives {
				s, a := n.mod(blob, v.AAD)
				ok, err := wrapCase(t, ctx, h, v, s, a)
				derived.Check(t, derivedCase(v, n.name), ok, err)
			}
		}
	}
	st.Report(t, "AES-256-GCM through ImportRoots + WrapOpen/WrapSeal", wycheproof.Valid)
	derived.Report(t, "AES-256-GCM through WrapOpen, negatives derived from those", wycheproof.Invalid)
}

// rotateWrap imports m.Wrap as hsmd/wrap/v<version>.
func rotateWrap(t *testing.T, h *hsm.HSM, m *hsm.RootMaterial, version uint32) {
	t.Helper()
	if err := h.ImportRoots(context.Background(), version, m, hsm.KindWrap); err != nil {
		t.Fatalf("ImportRoots wrap v%d: %v", version, err)
	}
}

// wrapCase opens blob with aad through WrapOpen and, for v's own blob and
// AAD, checks WrapSeal. It reports whether blob was accepted; a rejection
// other than exactly ErrWrapOpen fails t.
func wrapCase(t *testing.T, ctx context.Context, h *hsm.HSM, v wycheproof.AEADTest, blob, aad []byte) (bool, error) {
	pt, err := h.WrapOpen(ctx, blob, aad)
	if err != nil {
		if err != hsm.ErrWrapOpen {
			t.Errorf("%v: WrapOpen: %v, want exactly ErrWrapOpen", v.Case, err)
		}
		return false, err
	}
	if !bytes.Equal(pt, v.Msg) {
		return false, fmt.Errorf("WrapOpen returned %x, want %x", pt, v.Msg)
	}
	if !bytes.Equal(aad, v.AAD) {
		return true, nil
	}
	sealed, err := h.WrapSeal(ctx, v.Msg, v.AAD)
	if err != nil {
		return false, fmt.Errorf("WrapSeal: %w", err)
	}
	block, err := aes.NewCipher(v.Key)
	if err != nil {
		return false, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return false, err
	}
	if len(sealed) != 12+len(v.Msg)+16 {
		return false, fmt.Errorf("WrapSeal gave %d bytes, want a wrap/v1 blob of %d", len(sealed), 12+len(v.Msg)+16)
	}
	if got, err := gcm.Open(nil, sealed[:12], sealed[12:], v.AAD); err != nil || !bytes.Equal(got, v.Msg) {
		return false, errors.Join(errors.New("WrapSeal's blob does not open in software with the vector's key"), err)
	}
	return true, nil
}

// macVector reports why v does not fit the HSM's HMAC-SHA256, or "".
func macVector(g wycheproof.MACGroup, v wycheproof.MACTest) string {
	switch {
	case len(v.Key) < 32:
		return "key under 32 bytes (SoftHSM 2.6.1 refuses it with CKR_KEY_SIZE_RANGE; hsmd's kdk is 32 bytes)"
	case g.TagSize%8 != 0 || g.TagSize/8 > hsm.PRFSize || len(v.Tag) > hsm.PRFSize:
		return "tag longer than HMAC-SHA256"
	}
	return ""
}

// macCase reports whether mac (a full HMAC-SHA256) matches v's tag, which
// may be truncated (then its prefix is compared).
func macCase(v wycheproof.MACTest, mac []byte, err error) (bool, error) {
	if err != nil {
		return false, err
	}
	if len(mac) != hsm.PRFSize {
		return false, fmt.Errorf("HMAC of %d bytes", len(mac))
	}
	if !bytes.Equal(mac[:len(v.Tag)], v.Tag) {
		return false, fmt.Errorf("HMAC %x, tag %x", mac, v.Tag)
	}
	return true, nil
}

// TestWycheproofHSMHMAC runs the HMAC-SHA256 vectors through hmacWith (the
// HSM's CKM_SHA256_HMAC, which PRF calls) with the vector's key imported
// as a generic secret with the kdk's template: every key of 32 bytes or
// more, full or truncated tags (the prefix of the full HMAC is compared).
// A valid vector's tag must match, an invalid one's (modified) must not.
func TestWycheproofHSMHMAC(t *testing.T) {
	f := wycheproof.Load[wycheproof.MACGroup](t, "hmac_sha256_test.json")
	h := openHSM(t, testConfig(softhsm.NewTestToken(t)), nil)
	ctx := context.Background()
	var st wycheproof.Stats
	keys := map[string]pkcs11.ObjectHandle{}
	truncated := 0
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			if why := macVector(g, v); why != "" {
				st.Skip(why)
				continue
			}
			k, ok := keys[string(v.Key)]
			if !ok {
				var err error
				if k, err = h.WycheproofImportSecret(ctx, hsm.KindKDK, fmt.Sprintf("wycheproof/hmac/%d", len(keys)), v.Key); err != nil {
					t.Fatalf("%v: import: %v", v.Case, err)
				}
				keys[string(v.Key)] = k
			}
			mac, err := h.WycheproofHMAC(ctx, k, v.Msg)
			ok, err = macCase(v, mac, err)
			st.Check(t, v.Case, ok, err)
			if len(v.Tag) < hsm.PRFSize {
				truncated++
			}
		}
	}
	for _, k := range keys {
		if err := h.WycheproofDestroy(ctx, k); err != nil {
			t.Errorf("destroy: %v", err)
		}
	}
	st.Report(t, "HMAC-SHA256 in the HSM (hmacWith)", wycheproof.Valid, wycheproof.Invalid)
	t.Logf("HMAC-SHA256 in the HSM: %d distinct keys; %d vectors with truncated tags (prefix compared)", len(keys), truncated)
}

// TestWycheproofHSMPRF runs the HMAC-SHA256 vectors with 32-byte keys (the
// kdk's size, which RootMaterial requires) through PRF, hsmd's data key
// PRF: each distinct key is imported by ImportRoots as the next kdk
// version.
func TestWycheproofHSMPRF(t *testing.T) {
	f := wycheproof.Load[wycheproof.MACGroup](t, "hmac_sha256_test.json")
	h := openHSM(t, testConfig(softhsm.NewTestToken(t)), nil)
	ctx := context.Background()
	mat := testMaterial(t, 9)
	versions := map[string]uint32{}
	var st wycheproof.Stats
	for _, g := range f.Groups {
		for _, v := range g.Tests {
			if why := macVector(g, v); why != "" {
				st.Skip(why)
				continue
			}
			if len(v.Key) != 32 {
				st.Skip("key not 32 bytes (RootMaterial.KDK is 32 bytes)")
				continue
			}
			ver, ok := versions[string(v.Key)]
			if !ok {
				ver = uint32(len(versions) + 1)
				versions[string(v.Key)] = ver
				mat.KDK = bytes.Clone(v.Key)
				if err := h.ImportRoots(ctx, ver, mat, hsm.KindKDK); err != nil {
					t.Fatalf("ImportRoots kdk v%d: %v", ver, err)
				}
			}
			mac, err := h.PRF(ctx, ver, v.Msg)
			ok, err = macCase(v, mac, err)
			st.Check(t, v.Case, ok, err)
		}
	}
	st.Report(t, "HMAC-SHA256 through ImportRoots + PRF", wycheproof.Valid, wycheproof.Invalid)
	t.Logf("HMAC-SHA256 through PRF: %d distinct keys imported as kdk versions", len(versions))
}
