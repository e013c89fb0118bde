package hsm_test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

// rootFaults records the objects made and destroyed and injects faults
// into key creation and HMACs.
type rootFaults struct {
	hsm.Module
	corruptHMAC atomic.Bool  // flip a bit of every 32-byte C_Sign output
	badEdSeed   atomic.Bool  // flip a bit of the Ed25519 seed given to C_CreateObject
	failCreate  atomic.Int32 // if n > 0, the n-th C_CreateObject from now fails
	mu          sync.Mutex
	made, gone  map[pkcs11.ObjectHandle]bool
}

func newRootFaults() (*rootFaults, func(hsm.Module) hsm.Module) {
	f := &rootFaults{made: map[pkcs11.ObjectHandle]bool{}, gone: map[pkcs11.ObjectHandle]bool{}}
	return f, func(m hsm.Module) hsm.Module { f.Module = m; return f }
}

func (f *rootFaults) note(hs ...pkcs11.ObjectHandle) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, h := range hs {
		f.made[h] = true
	}
}

// leftovers returns the number of objects made and not destroyed.
func (f *rootFaults) leftovers() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for h := range f.made {
		if !f.gone[h] {
			n++
		}
	}
	return n
}

func (f *rootFaults) CreateObject(s pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if f.failCreate.Load() > 0 && f.failCreate.Add(-1) == 0 {
		return 0, pkcs11.Error(pkcs11.CKR_TEMPLATE_INCONSISTENT)
	}
	if f.badEdSeed.Load() && hasAttr(temp, pkcs11.CKA_KEY_TYPE, 0x40) && hasAttr(temp, pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY) {
		temp = slices.Clone(temp) // never touch the caller's material
		for i, a := range temp {
			if a.Type == pkcs11.CKA_VALUE {
				v := bytes.Clone(a.Value)
				v[0] ^= 1
				temp[i] = pkcs11.NewAttribute(pkcs11.CKA_VALUE, v)
			}
		}
	}
	o, err := f.Module.CreateObject(s, temp)
	if err == nil {
		f.note(o)
	}
	return o, err
}

func hasAttr(temp []*pkcs11.Attribute, typ, v uint) bool {
	want := pkcs11.NewAttribute(typ, v).Value
	for _, a := range temp {
		if a.Type == typ && bytes.Equal(a.Value, want) {
			return true
		}
	}
	return false
}

func (f *rootFaults) GenerateKey(s pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	o, err := f.Module.GenerateKey(s, m, temp)
	if err == nil {
		f.note(o)
	}
	return o, err
}

func (f *rootFaults) GenerateKeyPair(s pkcs11.SessionHandle, m []*pkcs11.Mechanism, pub, priv []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	p, q, err := f.Module.GenerateKeyPair(s, m, pub, priv)
	if err == nil {
		f.note(p, q)
	}
	return p, q, err
}

func (f *rootFaults) DestroyObject(s pkcs11.SessionHandle, o pkcs11.ObjectHandle) error {
	err := f.Module.DestroyObject(s, o)
	if err == nil {
		f.mu.Lock()
		f.gone[o] = true
		f.mu.Unlock()
	}
	return err
}

func (f *rootFaults) Sign(s pkcs11.SessionHandle, msg []byte) ([]byte, error) {
	out, err := f.Module.Sign(s, msg)
	if err == nil && len(out) == 32 && f.corruptHMAC.Load() {
		out[0] ^= 1
	}
	return out, err
}

// TestImportRootsSelfCheckFailure: when the HSM's key is not the
// material's, or creation fails halfway, no object is left behind and the
// loaded keys are unchanged.
func TestImportRootsSelfCheckFailure(t *testing.T) {
	ctx := context.Background()
	m1, m2 := testMaterial(t, 1), testMaterial(t, 2)
	for _, tc := range []struct {
		name  string
		arm   func(*rootFaults)
		words string
	}{
		{"wrong HMAC", func(f *rootFaults) { f.corruptHMAC.Store(true) }, "known answer"},
		{"wrong Ed25519 key", func(f *rootFaults) { f.badEdSeed.Store(true) }, "does not verify"},
		{"creation fails", func(f *rootFaults) { f.failCreate.Store(4) }, "CKR_TEMPLATE_INCONSISTENT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// On an empty token.
			tok := softhsm.NewTestToken(t)
			f, wrap := newRootFaults()
			h := openHSM(t, testConfig(tok), wrap)
			tc.arm(f)
			err := h.ImportRoots(ctx, 1, m1)
			if err == nil || !strings.Contains(err.Error(), tc.words) || !strings.Contains(err.Error(), "destroyed") {
				t.Fatalf("ImportRoots = %v, want a failure mentioning %q", err, tc.words)
			}
			wantVersions(t, h, map[string][]uint32{})
			if n := f.leftovers(); n != 0 {
				t.Fatalf("%d objects left behind", n)
			}
			if _, err := h.PRF(ctx, 1, []byte("x")); !errors.Is(err, hsm.ErrKeyNotFound) {
				t.Fatalf("PRF after a failed import = %v", err)
			}

			// Next to existing keys: they stay as they were.
			f2, wrap2 := newRootFaults()
			h2, _ := importedHSM(t, m1, wrap2)
			before := rootVersions(t, h2)
			tc.arm(f2)
			if err := h2.ImportRoots(ctx, 2, m2); err == nil || !strings.Contains(err.Error(), tc.words) {
				t.Fatalf("ImportRoots(v2) = %v", err)
			}
			f2.corruptHMAC.Store(false)
			wantVersions(t, h2, before)
			if n := f2.leftovers(); n != 4+2 { // only the v1 keys
				t.Fatalf("%d objects on the token, want the 6 of v1", n)
			}
			if h2.NewestKDK() != 1 {
				t.Fatalf("NewestKDK after a failed import = %d", h2.NewestKDK())
			}
			ed, ec := materialPublics(t, m1)
			checkSigns(t, h2, ed, ec)
		})
	}
}
