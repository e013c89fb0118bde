package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

// allV returns the RootVersions of a token holding versions vs of all four
// kinds.
func allV(vs ...uint32) map[string][]uint32 {
	out := map[string][]uint32{}
	for _, k := range hsm.RootKinds() {
		out[k] = vs
	}
	return out
}

func rootVersions(t *testing.T, h *hsm.HSM) map[string][]uint32 {
	t.Helper()
	got, err := h.RootVersions(context.Background())
	if err != nil {
		t.Fatalf("RootVersions: %v", err)
	}
	return got
}

func wantVersions(t *testing.T, h *hsm.HSM, want map[string][]uint32) {
	t.Helper()
	if got := rootVersions(t, h); !reflect.DeepEqual(got, want) {
		t.Fatalf("RootVersions = %v, want %v", got, want)
	}
}

// importedHSM opens a fresh token and imports m at version 1.
func importedHSM(t *testing.T, m *hsm.RootMaterial, wrap func(hsm.Module) hsm.Module) (*hsm.HSM, softhsm.TestToken) {
	t.Helper()
	tok := softhsm.NewTestToken(t)
	h := openHSM(t, testConfig(tok), wrap)
	if err := h.ImportRoots(context.Background(), 1, m); err != nil {
		t.Fatalf("ImportRoots: %v", err)
	}
	return h, tok
}

func publicKey(t *testing.T, h *hsm.HSM, alg hsm.SignAlg, version uint32) crypto.PublicKey {
	t.Helper()
	s, err := h.SignerVersion(context.Background(), alg, version)
	if err != nil {
		t.Fatalf("SignerVersion(%v, %d): %v", alg, version, err)
	}
	return s.Public()
}

// materialPublics derives the public keys of m in software.
func materialPublics(t *testing.T, m *hsm.RootMaterial) (ed25519.PublicKey, *ecdsa.PublicKey) {
	t.Helper()
	ed := ed25519.NewKeyFromSeed(m.Ed25519Seed).Public().(ed25519.PublicKey)
	k, err := ecdh.P256().NewPrivateKey(m.P256Scalar)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), k.PublicKey().Bytes())
	if err != nil {
		t.Fatal(err)
	}
	return ed, ec
}

// checkSigns signs with the newest key of each algorithm and verifies
// under want (Ed25519, then P-256).
func checkSigns(t *testing.T, h *hsm.HSM, wantEd ed25519.PublicKey, wantEC *ecdsa.PublicKey) {
	t.Helper()
	ctx := context.Background()
	msg := []byte("checkpoint")
	es, err := h.Signer(ctx, hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := es.Sign(rand.Reader, msg, crypto.Hash(0))
	if err != nil || !ed25519.Verify(wantEd, msg, sig) {
		t.Fatalf("Ed25519 signature does not verify under the expected key (err %v)", err)
	}
	cs, err := h.Signer(ctx, hsm.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(msg)
	sig, err = cs.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(wantEC, digest[:], sig) {
		t.Fatalf("ECDSA signature does not verify under the expected key (err %v)", err)
	}
}

// TestImportRootsKeyInfo: imported keys carry exactly the attributes of
// generated ones, except the token's own provenance flags.
func TestImportRootsKeyInfo(t *testing.T) {
	ctx := context.Background()
	m := testMaterial(t, 1)
	imp, _ := importedHSM(t, m, nil)
	gen, _ := newKeyedHSM(t)
	for _, label := range hsm.RootKeyLabels() {
		ki, err := imp.KeyInfo(ctx, label)
		if err != nil {
			t.Fatalf("KeyInfo(%s): %v", label, err)
		}
		if !ki.Sensitive || ki.Extractable || !ki.Token || !ki.Private || ki.ValueReadable || ki.Modifiable || ki.Copyable {
			t.Errorf("imported %s: %+v; want sensitive, not extractable, token, private, value unreadable, not modifiable, not copyable", label, ki)
		}
		if ki.Label != label || !bytes.Equal(ki.ID, hsm.KeyID(label)) {
			t.Errorf("imported %s: label %q id %x", label, ki.Label, ki.ID)
		}
		if ki.Local || ki.AlwaysSensitive || ki.NeverExtractable {
			t.Errorf("imported %s: local=%v always sensitive=%v never extractable=%v, want false (material came from outside)", label, ki.Local, ki.AlwaysSensitive, ki.NeverExtractable)
		}
		gi, err := gen.KeyInfo(ctx, label)
		if err != nil {
			t.Fatal(err)
		}
		if !gi.Local || !gi.AlwaysSensitive || !gi.NeverExtractable {
			t.Errorf("generated %s: local=%v always sensitive=%v never extractable=%v, want true", label, gi.Local, gi.AlwaysSensitive, gi.NeverExtractable)
		}
		gi.Local, gi.AlwaysSensitive, gi.NeverExtractable = ki.Local, ki.AlwaysSensitive, ki.NeverExtractable
		if !reflect.DeepEqual(ki, gi) {
			t.Errorf("%s: imported %+v\n generated %+v", label, ki, gi)
		}
	}
	// A fresh HSM loads the imported keys.
	if err := imp.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestImportRootsRestore: the same material on two fresh tokens gives the
// same PRF, the same public keys, and blobs sealed on one open on the
// other, for wrap/v1 and for the versioned format of wrap/v2.
func TestImportRootsRestore(t *testing.T) {
	ctx := context.Background()
	m1, m2 := testMaterial(t, 1), testMaterial(t, 2)
	a, _ := importedHSM(t, m1, nil)
	b, _ := importedHSM(t, m1, nil)
	msg := []byte("hsmd/dek/v1 tenant")
	mac := hmac.New(sha256.New, m1.KDK)
	mac.Write(msg)
	want := mac.Sum(nil)
	for _, h := range []*hsm.HSM{a, b} {
		if got, err := h.PRF(ctx, 1, msg); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("PRF = %x, %v; want %x", got, err, want)
		}
	}
	ed, ec := materialPublics(t, m1)
	for _, h := range []*hsm.HSM{a, b} {
		if !ed.Equal(publicKey(t, h, hsm.Ed25519, 1)) || !ec.Equal(publicKey(t, h, hsm.ECDSAP256, 1)) {
			t.Fatal("public keys differ from the material's")
		}
		checkSigns(t, h, ed, ec)
	}
	aad := []byte("hsmd/audit/mldsa-44/v1")
	v1blob, err := a.WrapSeal(ctx, []byte("secret"), aad)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := b.WrapOpen(ctx, v1blob, aad); err != nil || string(got) != "secret" {
		t.Fatalf("WrapOpen on the other token = %q, %v", got, err)
	}
	// A second version, imported on both.
	for _, h := range []*hsm.HSM{a, b} {
		if err := h.ImportRoots(ctx, 2, m2); err != nil {
			t.Fatalf("ImportRoots(v2): %v", err)
		}
		if h.NewestKDK() != 2 {
			t.Fatalf("NewestKDK = %d", h.NewestKDK())
		}
	}
	v2blob, err := b.WrapSeal(ctx, []byte("secret 2"), aad)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*hsm.HSM{a, b} {
		if got, err := h.WrapOpen(ctx, v2blob, aad); err != nil || string(got) != "secret 2" {
			t.Fatalf("WrapOpen(v2 blob) = %q, %v", got, err)
		}
		if got, err := h.WrapOpen(ctx, v1blob, aad); err != nil || string(got) != "secret" {
			t.Fatalf("WrapOpen(v1 blob) after v2 = %q, %v", got, err)
		}
		ed2, ec2 := materialPublics(t, m2)
		checkSigns(t, h, ed2, ec2)
	}
}

// TestWrapFormats checks both sealed formats against an AES-GCM
// implementation outside the HSM, including a wrap/v1 blob whose IV starts
// like a versioned header.
func TestWrapFormats(t *testing.T) {
	ctx := context.Background()
	m1, m2 := testMaterial(t, 1), testMaterial(t, 2)
	h, _ := importedHSM(t, m1, nil)
	aad := []byte("hsmd/wrap/test")
	gcm := func(key []byte) cipher.AEAD {
		b, err := aes.NewCipher(key)
		if err != nil {
			t.Fatal(err)
		}
		g, err := cipher.NewGCM(b)
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	// wrap/v1: iv || ct || tag, AAD = aad.
	sealed, err := h.WrapSeal(ctx, []byte("one"), aad)
	if err != nil || len(sealed) != 12+3+16 {
		t.Fatalf("WrapSeal under v1: %d bytes, %v", len(sealed), err)
	}
	if pt, err := gcm(m1.Wrap).Open(nil, sealed[:12], sealed[12:], aad); err != nil || string(pt) != "one" {
		t.Fatalf("v1 blob does not open in software: %v", err)
	}
	if err := h.ImportRoots(ctx, 2, m2, hsm.KindWrap); err != nil {
		t.Fatal(err)
	}
	// wrap/v2: "hsw2" || 2 || iv || ct || tag, AAD = header || aad.
	sealed2, err := h.WrapSeal(ctx, []byte("two"), aad)
	if err != nil || len(sealed2) != 8+12+3+16 || string(sealed2[:4]) != "hsw2" || binary.BigEndian.Uint32(sealed2[4:8]) != 2 {
		t.Fatalf("WrapSeal under v2: %x, %v", sealed2, err)
	}
	hdr := sealed2[:8]
	if pt, err := gcm(m2.Wrap).Open(nil, sealed2[8:20], sealed2[20:], append(bytes.Clone(hdr), aad...)); err != nil || string(pt) != "two" {
		t.Fatalf("v2 blob does not open in software: %v", err)
	}
	for i := range sealed2 {
		bad := bytes.Clone(sealed2)
		bad[i] ^= 0x04
		if _, err := h.WrapOpen(ctx, bad, aad); err != hsm.ErrWrapOpen {
			t.Fatalf("WrapOpen(v2 blob with byte %d changed) = %v, want exactly ErrWrapOpen", i, err)
		}
	}
	// A v1 blob whose random IV starts with a valid v2 header still opens.
	iv := append(bytes.Clone(hdr), 1, 2, 3, 4)
	odd := append(iv, gcm(m1.Wrap).Seal(nil, iv, []byte("old"), aad)...)
	if pt, err := h.WrapOpen(ctx, odd, aad); err != nil || string(pt) != "old" {
		t.Fatalf("WrapOpen(v1 blob with a header-like IV) = %q, %v", pt, err)
	}
	// A header naming a version not on the token.
	v3 := bytes.Clone(sealed2)
	binary.BigEndian.PutUint32(v3[4:8], 3)
	if _, err := h.WrapOpen(ctx, v3, aad); err != hsm.ErrWrapOpen {
		t.Fatalf("WrapOpen(unknown wrap version) = %v", err)
	}
}

// TestImportRootsRefusesExisting: an import onto existing labels creates
// nothing and changes nothing.
func TestImportRootsRefusesExisting(t *testing.T) {
	ctx := context.Background()
	m1, m2 := testMaterial(t, 1), testMaterial(t, 2)
	h, _ := importedHSM(t, m1, nil)
	before, _ := h.PRF(ctx, 1, []byte("x"))
	err := h.ImportRoots(ctx, 1, m2)
	if !errors.Is(err, hsm.ErrKeyExists) {
		t.Fatalf("re-import = %v, want ErrKeyExists", err)
	}
	for _, l := range hsm.RootKeyLabels() {
		if !strings.Contains(err.Error(), l) {
			t.Errorf("error %q does not name %s", err, l)
		}
	}
	if err := h.ImportRoots(ctx, 2, m2, hsm.KindKDK); err != nil {
		t.Fatal(err)
	}
	// All kinds at v2, where only kdk/v2 exists: refused as a whole.
	err = h.ImportRoots(ctx, 2, m2)
	if !errors.Is(err, hsm.ErrKeyExists) || !strings.Contains(err.Error(), "hsmd/kdk/v2") || strings.Contains(err.Error(), "hsmd/wrap/v2") {
		t.Fatalf("import over kdk/v2 = %v", err)
	}
	want := allV(1)
	want[hsm.KindKDK] = []uint32{1, 2}
	wantVersions(t, h, want)
	if after, err := h.PRF(ctx, 1, []byte("x")); err != nil || !bytes.Equal(after, before) {
		t.Fatal("a refused import changed the PRF")
	}
	if err := h.InitKeys(ctx); !errors.Is(err, hsm.ErrKeysExist) {
		t.Fatalf("InitKeys on an imported token = %v", err)
	}
	for _, tc := range []struct {
		v     uint32
		kinds []string
	}{{0, nil}, {3, []string{"nope"}}, {3, []string{hsm.KindKDK, hsm.KindKDK}}} {
		if err := h.ImportRoots(ctx, tc.v, m2, tc.kinds...); err == nil {
			t.Errorf("ImportRoots(%d, %v) succeeded", tc.v, tc.kinds)
		}
	}
	if err := h.ImportRoots(ctx, 3, &hsm.RootMaterial{}); !errors.Is(err, hsm.ErrInvalidMaterial) {
		t.Errorf("ImportRoots(empty material) = %v", err)
	}
	wantVersions(t, h, want)
}

// TestCreateRootsRotation: a new version generated in the HSM becomes the
// newest kdk, signing key and wrap key; older versions keep working until
// destroyed; the last version cannot be destroyed.
func TestCreateRootsRotation(t *testing.T) {
	ctx := context.Background()
	h, tok := newKeyedHSM(t)
	aad := []byte("hsmd/wrap/test")
	oldBlob, err := h.WrapSeal(ctx, []byte("old"), aad)
	if err != nil {
		t.Fatal(err)
	}
	oldSigner, err := h.Signer(ctx, hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.CreateRoots(ctx, 2); err != nil {
		t.Fatalf("CreateRoots(2): %v", err)
	}
	if h.NewestKDK() != 2 {
		t.Fatalf("NewestKDK = %d, want 2", h.NewestKDK())
	}
	p1, _ := h.PRF(ctx, 1, []byte("x"))
	p2, err := h.PRF(ctx, 2, []byte("x"))
	if err != nil || bytes.Equal(p1, p2) {
		t.Fatalf("PRF(v2) = %x, %v (v1 %x)", p2, err, p1)
	}
	for _, alg := range []hsm.SignAlg{hsm.Ed25519, hsm.ECDSAP256} {
		s, err := h.Signer(ctx, alg)
		if err != nil {
			t.Fatal(err)
		}
		v1, v2 := publicKey(t, h, alg, 1), publicKey(t, h, alg, 2)
		if !s.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(v2) ||
			v1.(interface{ Equal(crypto.PublicKey) bool }).Equal(v2) {
			t.Fatalf("%v: Signer does not use the new version", alg)
		}
	}
	ed1 := oldSigner.Public().(ed25519.PublicKey)
	ed2 := publicKey(t, h, hsm.Ed25519, 2).(ed25519.PublicKey)
	checkSigns(t, h, ed2, publicKey(t, h, hsm.ECDSAP256, 2).(*ecdsa.PublicKey))
	if sig, err := oldSigner.Sign(nil, []byte("m"), crypto.Hash(0)); err != nil || !ed25519.Verify(ed1, []byte("m"), sig) {
		t.Fatalf("a v1 signer after rotation: %v", err)
	}
	newBlob, err := h.WrapSeal(ctx, []byte("new"), aad)
	if err != nil || len(newBlob) != 8+12+3+16 {
		t.Fatalf("WrapSeal under v2: %d bytes, %v", len(newBlob), err)
	}
	for blob, want := range map[*[]byte]string{&oldBlob: "old", &newBlob: "new"} {
		if got, err := h.WrapOpen(ctx, *blob, aad); err != nil || string(got) != want {
			t.Fatalf("WrapOpen = %q, %v; want %q", got, err, want)
		}
	}
	ki, err := h.KeyInfo(ctx, hsm.KeyLabel(hsm.KindSigEd25519, 2))
	if err != nil || !ki.Local || !ki.Sensitive || ki.Extractable || ki.Modifiable || ki.Copyable {
		t.Fatalf("KeyInfo(sig-ed25519/v2) = %+v, %v", ki, err)
	}
	// Subsets and refusals.
	if err := h.CreateRoots(ctx, 3, hsm.KindKDK); err != nil {
		t.Fatal(err)
	}
	if err := h.CreateRoots(ctx, 2); !errors.Is(err, hsm.ErrKeyExists) {
		t.Fatalf("CreateRoots(2) again = %v, want ErrKeyExists", err)
	}
	want := allV(1, 2)
	want[hsm.KindKDK] = []uint32{1, 2, 3}
	wantVersions(t, h, want)
	// Another HSM on the token loads several versions of each kind.
	h2 := openHSM(t, testConfig(tok), nil)
	if err := h2.LoadKeys(ctx); err != nil || h2.NewestKDK() != 3 {
		t.Fatalf("LoadKeys with several versions: %v, newest kdk %d", err, h2.NewestKDK())
	}
	if got, err := h2.PRF(ctx, 2, []byte("x")); err != nil || !bytes.Equal(got, p2) {
		t.Fatalf("PRF(v2) on another HSM = %x, %v", got, err)
	}

	// Destroy the v1 keys.
	for _, k := range hsm.RootKinds() {
		if err := h.DestroyRoot(ctx, k, 1); err != nil {
			t.Fatalf("DestroyRoot(%s, 1): %v", k, err)
		}
	}
	want = allV(2)
	want[hsm.KindKDK] = []uint32{2, 3}
	wantVersions(t, h, want)
	if _, err := h.PRF(ctx, 1, []byte("x")); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("PRF(v1) after DestroyRoot = %v", err)
	}
	if _, err := oldSigner.Sign(nil, []byte("m"), crypto.Hash(0)); !errors.Is(err, hsm.ErrKeyNotFound) || hsm.IsFatal(err) {
		t.Fatalf("a signer of a destroyed key = %v, want ErrKeyNotFound", err)
	}
	if _, err := h.WrapOpen(ctx, oldBlob, aad); err != hsm.ErrWrapOpen {
		t.Fatalf("WrapOpen of a wrap/v1 blob after DestroyRoot = %v", err)
	}
	if got, err := h.WrapOpen(ctx, newBlob, aad); err != nil || string(got) != "new" {
		t.Fatalf("WrapOpen(v2 blob) = %q, %v", got, err)
	}
	if err := h.Ready(ctx); err != nil {
		t.Fatalf("Ready after DestroyRoot: %v", err)
	}
	for _, k := range []string{hsm.KindWrap, hsm.KindSigP256, hsm.KindSigEd25519} {
		if err := h.DestroyRoot(ctx, k, 2); !errors.Is(err, hsm.ErrLastVersion) {
			t.Fatalf("DestroyRoot(%s, 2) = %v, want ErrLastVersion", k, err)
		}
	}
	if err := h.DestroyRoot(ctx, hsm.KindKDK, 7); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("DestroyRoot(kdk, 7) = %v, want ErrKeyNotFound", err)
	}
	if err := h.DestroyRoot(ctx, "nope", 2); err == nil {
		t.Fatal("DestroyRoot of an unknown kind succeeded")
	}
	if err := h.DestroyRoot(ctx, hsm.KindKDK, 3); err != nil {
		t.Fatal(err)
	}
	if err := h.DestroyRoot(ctx, hsm.KindKDK, 2); !errors.Is(err, hsm.ErrLastVersion) {
		t.Fatalf("DestroyRoot(kdk, 2) = %v, want ErrLastVersion", err)
	}
	wantVersions(t, h, allV(2))
	if h.NewestKDK() != 2 {
		t.Fatalf("NewestKDK = %d", h.NewestKDK())
	}
	h3 := openHSM(t, testConfig(tok), nil)
	if err := h3.LoadKeys(ctx); err != nil {
		t.Fatalf("LoadKeys with only v2 keys: %v", err)
	}
	checkSigns(t, h3, ed2, publicKey(t, h3, hsm.ECDSAP256, 2).(*ecdsa.PublicKey))
}

// TestCreateRootsConcurrent: two HSMs creating the same version at once:
// one succeeds, the other is refused, and the token holds one key per
// label.
func TestCreateRootsConcurrent(t *testing.T) {
	ctx := context.Background()
	_, tok := newKeyedHSM(t)
	hs := []*hsm.HSM{openHSM(t, testConfig(tok), nil), openHSM(t, testConfig(tok), nil)}
	errs := make([]error, len(hs))
	var wg sync.WaitGroup
	for i, h := range hs {
		wg.Go(func() { errs[i] = h.CreateRoots(ctx, 2) })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, hsm.ErrKeyExists):
			t.Fatalf("CreateRoots = %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d of 2 concurrent CreateRoots succeeded, want 1", ok)
	}
	wantVersions(t, hs[0], allV(1, 2))
	if err := hs[0].LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
}
