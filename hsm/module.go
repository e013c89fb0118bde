package hsm

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// Module is the part of a PKCS#11 module (*pkcs11.Ctx) that this package
// uses. It exists so that wrappers can sit between the HSM and the real
// module: a session counter (always), and fault injection or delays in
// tests (see OpenWithModuleWrapper). Implementations must be safe for
// concurrent use, as *pkcs11.Ctx is.
type Module interface {
	GetSlotList(tokenPresent bool) ([]uint, error)
	GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error)
	OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error)
	CloseSession(sh pkcs11.SessionHandle) error
	Login(sh pkcs11.SessionHandle, userType uint, pin string) error
	Logout(sh pkcs11.SessionHandle) error
	FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error
	FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error)
	FindObjectsFinal(sh pkcs11.SessionHandle) error
	GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error)
	GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error)
	CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)
	DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error
	SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error)
	DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error
	Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error)
}

var _ Module = (*pkcs11.Ctx)(nil)

// countingModule counts sessions opened and not yet closed through it.
type countingModule struct {
	Module
	open atomic.Int64
}

func (m *countingModule) OpenSession(slot uint, flags uint) (pkcs11.SessionHandle, error) {
	s, err := m.Module.OpenSession(slot, flags)
	if err == nil {
		m.open.Add(1)
	}
	return s, err
}

func (m *countingModule) CloseSession(s pkcs11.SessionHandle) error {
	err := m.Module.CloseSession(s)
	// A session the module no longer knows is gone either way, and so is
	// one on a removed token or in a module that lost its state.
	switch err {
	case nil, pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID), pkcs11.Error(pkcs11.CKR_SESSION_CLOSED),
		pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT), pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED),
		pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED):
		m.open.Add(-1)
	}
	return err
}

// The module registry shares one loaded, initialized *pkcs11.Ctx per module
// file among all users in the process: a PKCS#11 library has one state per
// process, so a second C_Initialize fails and a C_Finalize would pull the
// module from under every other user.
var registry = struct {
	sync.Mutex
	mods map[string]*loadedModule
}{mods: map[string]*loadedModule{}}

type loadedModule struct {
	path  string
	ctx   *pkcs11.Ctx
	refs  int
	owned bool                 // this process's Initialize succeeded, so Finalize is ours
	users map[uint]*tokenLogin // slot -> login state shared by HSMs on that token
	macK  [32]byte             // per-process key for PIN fingerprints
}

// tokenLogin is the shared login state of one token: PKCS#11 logins are per
// process and token, not per session or per HSM.
type tokenLogin struct {
	users  int
	pinMAC []byte // HMAC of the PIN that logged in, to check later Opens
}

// LoadModule loads and initializes the PKCS#11 module at path, or shares the
// copy already loaded in this process. A module initialized elsewhere in the
// process (CKR_CRYPTOKI_ALREADY_INITIALIZED) is used but never finalized.
// The caller must call release exactly once when done; the last release
// finalizes and unloads the module. Tools such as package softhsm use this
// so that they never finalize a module an HSM is using.
func LoadModule(path string) (ctx *pkcs11.Ctx, release func() error, err error) {
	lm, err := acquireModule(path)
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	release = func() error {
		var err error
		once.Do(func() { err = lm.release() })
		return err
	}
	return lm.ctx, release, nil
}

func acquireModule(path string) (*loadedModule, error) {
	if HasPINValue(path) {
		return nil, fmt.Errorf("%w: hsm.module must not contain pin-value=", ErrInvalidConfig)
	}
	key, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, fmt.Errorf("hsm: module %s: %w", path, err)
	}
	registry.Lock()
	defer registry.Unlock()
	if lm := registry.mods[key]; lm != nil {
		lm.refs++
		return lm, nil
	}
	ctx := pkcs11.New(key)
	if ctx == nil {
		return nil, fmt.Errorf("hsm: cannot load PKCS#11 module %s", path)
	}
	owned := true
	if err := ctx.Initialize(); err != nil {
		if err != pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
			ctx.Destroy()
			return nil, fmt.Errorf("hsm: initializing module %s: %w", path, err)
		}
		owned = false
	}
	lm := &loadedModule{path: key, ctx: ctx, refs: 1, owned: owned, users: map[uint]*tokenLogin{}}
	if _, err := rand.Read(lm.macK[:]); err != nil {
		panic("hsm: crypto/rand failed: " + err.Error())
	}
	registry.mods[key] = lm
	return lm, nil
}

func (lm *loadedModule) release() error {
	registry.Lock()
	defer registry.Unlock()
	lm.refs--
	if lm.refs > 0 {
		return nil
	}
	delete(registry.mods, lm.path)
	var err error
	if lm.owned {
		if e := lm.ctx.Finalize(); e != nil {
			err = fmt.Errorf("hsm: finalizing module %s: %w", lm.path, e)
		}
	}
	lm.ctx.Destroy()
	return err
}

// reinitialize calls C_Initialize again after the module reported
// CKR_CRYPTOKI_NOT_INITIALIZED (someone in the process finalized it).
// Another user may have done so first (CKR_CRYPTOKI_ALREADY_INITIALIZED).
// It never finalizes: other HSMs of the process may be mid-call.
func (lm *loadedModule) reinitialize() error {
	registry.Lock()
	defer registry.Unlock()
	err := lm.ctx.Initialize()
	switch {
	case err == nil:
		lm.owned = true
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
	default:
		return fmt.Errorf("hsm: re-initializing module %s: %w", lm.path, err)
	}
	return nil
}

func (lm *loadedModule) pinMAC(pin []byte) []byte {
	m := hmac.New(sha256.New, lm.macK[:])
	m.Write(pin)
	return m.Sum(nil)
}

// joinToken records a user of the token in slot and returns the PIN
// fingerprint of an existing login, or nil if there is none.
func (lm *loadedModule) joinToken(slot uint) []byte {
	registry.Lock()
	defer registry.Unlock()
	tl := lm.users[slot]
	if tl == nil {
		tl = &tokenLogin{}
		lm.users[slot] = tl
	}
	tl.users++
	return tl.pinMAC
}

func (lm *loadedModule) setLogin(slot uint, mac []byte) {
	registry.Lock()
	defer registry.Unlock()
	if tl := lm.users[slot]; tl != nil {
		tl.pinMAC = mac
	}
}

// leaveToken drops a user of the token and reports whether it was the last.
func (lm *loadedModule) leaveToken(slot uint) bool {
	registry.Lock()
	defer registry.Unlock()
	tl := lm.users[slot]
	if tl == nil {
		return true
	}
	tl.users--
	if tl.users > 0 {
		return false
	}
	delete(lm.users, slot)
	return true
}
