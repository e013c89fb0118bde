package hsm_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

func TestInitKeysThenLoadKeys(t *testing.T) {
	ctx := context.Background()
	h, tok := newKeyedHSM(t)
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatalf("LoadKeys: %v", err)
	}
	err := h.InitKeys(ctx)
	if !errors.Is(err, hsm.ErrKeysExist) {
		t.Fatalf("second InitKeys = %v, want ErrKeysExist", err)
	}
	// A second HSM on the same token finds the keys.
	h2 := openHSM(t, testConfig(tok), nil)
	if err := h2.LoadKeys(ctx); err != nil {
		t.Fatalf("LoadKeys on second HSM: %v", err)
	}
}

func TestLoadKeysMissing(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	h := openHSM(t, testConfig(tok), nil)
	err := h.LoadKeys(context.Background())
	if !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("LoadKeys on empty token = %v, want ErrKeyNotFound", err)
	}
	if _, err := h.PRF(context.Background(), 1, []byte("x")); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("PRF without keys = %v, want ErrKeyNotFound", err)
	}
}

func TestKeyInfoRootKeysNotExtractable(t *testing.T) {
	h, _ := newKeyedHSM(t)
	for _, label := range hsm.RootKeyLabels() {
		ki, err := h.KeyInfo(context.Background(), label)
		if err != nil {
			t.Fatalf("KeyInfo(%s): %v", label, err)
		}
		if !ki.Sensitive || ki.Extractable || !ki.Token || !ki.Private || ki.ValueReadable {
			t.Errorf("KeyInfo(%s) = %+v; want sensitive, not extractable, token, private, value unreadable", label, ki)
		}
		if ki.Modifiable || ki.Copyable {
			t.Errorf("KeyInfo(%s): modifiable=%v copyable=%v, want both false", label, ki.Modifiable, ki.Copyable)
		}
		if ki.Label != label || !bytes.Equal(ki.ID, hsm.KeyID(label)) {
			t.Errorf("KeyInfo(%s): label %q id %x", label, ki.Label, ki.ID)
		}
	}
	if _, err := h.KeyInfo(context.Background(), "hsmd/nope/v1"); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("KeyInfo(unknown) = %v, want ErrKeyNotFound", err)
	}
}

func TestKeyLabel(t *testing.T) {
	if got := hsm.KeyLabel(hsm.KindKDK, 1); got != hsm.LabelKDKv1 {
		t.Errorf("KeyLabel = %q", got)
	}
	if got := hsm.KeyLabel(hsm.KindSigEd25519, 12); got != "hsmd/sig-ed25519/v12" {
		t.Errorf("KeyLabel = %q", got)
	}
}

func TestPRF(t *testing.T) {
	ctx := context.Background()
	h, tok := newKeyedHSM(t)
	a1, err := h.PRF(ctx, 1, []byte("message a"))
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := h.PRF(ctx, 1, []byte("message a"))
	b, _ := h.PRF(ctx, 1, []byte("message b"))
	empty, err := h.PRF(ctx, 1, nil)
	if err != nil {
		t.Fatalf("PRF(empty): %v", err)
	}
	if len(a1) != 32 || !bytes.Equal(a1, a2) || bytes.Equal(a1, b) || len(empty) != 32 {
		t.Fatalf("PRF outputs: a1=%x a2=%x b=%x", a1, a2, b)
	}
	// Another HSM instance on the same token derives the same value, and
	// closing one leaves the other logged in.
	h2 := openHSM(t, testConfig(tok), nil)
	if err := h2.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := h2.PRF(ctx, 1, []byte("message a"))
	if err != nil || !bytes.Equal(got, a1) {
		t.Fatalf("PRF on second HSM = %x, %v; want %x", got, err, a1)
	}
	checkedClose(t, h2)
	if got, err := h.PRF(ctx, 1, []byte("message a")); err != nil || !bytes.Equal(got, a1) {
		t.Fatalf("PRF after closing the other HSM = %x, %v", got, err)
	}
	if _, err := h.PRF(ctx, 2, []byte("x")); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Fatalf("PRF(kdk v2) = %v, want ErrKeyNotFound", err)
	}
}

func TestWrapSealOpen(t *testing.T) {
	ctx := context.Background()
	h, _ := newKeyedHSM(t)
	msg, aad := []byte("an ML-DSA private key, say"), []byte("hsmd/wrap/test")
	sealed, err := h.WrapSeal(ctx, msg, aad)
	if err != nil {
		t.Fatal(err)
	}
	if len(sealed) != 12+len(msg)+16 {
		t.Fatalf("sealed length %d", len(sealed))
	}
	again, _ := h.WrapSeal(ctx, msg, aad)
	if bytes.Equal(sealed[:12], again[:12]) {
		t.Fatal("two seals used the same IV")
	}
	got, err := h.WrapOpen(ctx, sealed, aad)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("WrapOpen = %q, %v", got, err)
	}
	for i := range sealed {
		bad := bytes.Clone(sealed)
		bad[i] ^= 0x10
		if _, err := h.WrapOpen(ctx, bad, aad); err != hsm.ErrWrapOpen {
			t.Fatalf("WrapOpen with byte %d flipped = %v, want exactly ErrWrapOpen", i, err)
		}
	}
	for _, tc := range []struct {
		name        string
		sealed, aad []byte
	}{
		{"wrong aad", sealed, []byte("hsmd/wrap/other")},
		{"empty aad", sealed, nil},
		{"short", sealed[:27], aad},
		{"truncated tag", sealed[:len(sealed)-1], aad},
	} {
		if _, err := h.WrapOpen(ctx, tc.sealed, tc.aad); err != hsm.ErrWrapOpen {
			t.Errorf("%s: WrapOpen = %v, want ErrWrapOpen", tc.name, err)
		}
	}
	// Failures leave the pool's sessions usable.
	if got, err := h.WrapOpen(ctx, sealed, aad); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("WrapOpen after failures = %q, %v", got, err)
	}
	if _, err := h.WrapSeal(ctx, msg, nil); err == nil {
		t.Fatal("WrapSeal with empty aad succeeded")
	}
}
