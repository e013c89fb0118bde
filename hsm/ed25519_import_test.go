package hsm_test

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

// TestSoftHSMEd25519CreateObject records what SoftHSM 2.6.1 accepts for an
// imported Ed25519 key: CKA_EC_PARAMS as the OID (what hsmd uses) or as
// the PrintableString "edwards25519", with CKA_VALUE the 32-byte seed; a
// 64-byte seed || public key is accepted by C_CreateObject but cannot
// sign. The public key's CKA_EC_POINT must be DER-wrapped.
func TestSoftHSMEd25519CreateObject(t *testing.T) {
	tok := softhsm.NewTestToken(t)
	ctx, release, err := hsm.LoadModule(tok.Module)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	var s pkcs11.SessionHandle
	for _, slot := range slots {
		if ti, err := ctx.GetTokenInfo(slot); err == nil && ti.Label == tok.Label {
			if s, err = ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
				t.Fatal(err)
			}
		}
	}
	defer ctx.CloseSession(s)
	if err := ctx.Login(s, pkcs11.CKU_USER, string(tok.UserPIN)); err != nil {
		t.Fatal(err)
	}
	defer ctx.Logout(s)
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, 32))
	pub := priv.Public().(ed25519.PublicKey)
	msg := []byte("m")
	eddsa := []*pkcs11.Mechanism{pkcs11.NewMechanism(0x1057, nil)} // CKM_EDDSA
	sign := func(params, value []byte) error {
		o, err := ctx.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, 0x40), // CKK_EC_EDWARDS
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, value),
		})
		if err != nil {
			return err
		}
		defer ctx.DestroyObject(s, o)
		if err := ctx.SignInit(s, eddsa, o); err != nil {
			return err
		}
		sig, err := ctx.Sign(s, msg)
		if err != nil {
			return err
		}
		if !ed25519.Verify(pub, msg, sig) {
			return errors.New("signature does not verify")
		}
		return nil
	}
	oid := []byte{0x06, 0x03, 0x2b, 0x65, 0x70}
	printable := append([]byte{0x13, 12}, "edwards25519"...)
	for name, params := range map[string][]byte{"OID": oid, "PrintableString": printable} {
		if err := sign(params, priv.Seed()); err != nil {
			t.Errorf("%s params with the 32-byte seed: %v", name, err)
		}
	}
	if err := sign(oid, priv); err == nil {
		t.Error("a 64-byte CKA_VALUE signed; SoftHSM behaviour changed")
	}
	verify := func(point []byte) error {
		o, err := ctx.CreateObject(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, 0x40),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, oid),
			pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, point),
		})
		if err != nil {
			return err
		}
		defer ctx.DestroyObject(s, o)
		if err := ctx.VerifyInit(s, eddsa, o); err != nil {
			return err
		}
		return ctx.Verify(s, msg, ed25519.Sign(priv, msg))
	}
	if err := verify(append([]byte{0x04, 32}, pub...)); err != nil {
		t.Errorf("DER-wrapped CKA_EC_POINT: %v", err)
	}
	if err := verify(pub); err == nil {
		t.Error("a bare CKA_EC_POINT verified; SoftHSM behaviour changed")
	}
}
