// Package hsmfault injects PKCS#11 faults between package hsm and the real
// module, for tests: an Injector is an hsm.Module that forwards every call
// to the module underneath (SoftHSM in hsmd's tests, never a fake) and,
// when told to, fails a call or delays it first.
//
// # Faults
//
//   - DeviceError: CKR_DEVICE_ERROR (hsm: retryable, the session is
//     replaced).
//   - SessionInvalid: CKR_SESSION_HANDLE_INVALID, after really closing the
//     session in the module, as a lost session is (hsm: retryable, the
//     session is replaced). A later CloseSession of that handle answers
//     CKR_SESSION_HANDLE_INVALID without reaching the module, so that the
//     hsm package's session count stays right.
//   - TokenNotPresent: CKR_TOKEN_NOT_PRESENT from every call, C_GetTokenInfo
//     and C_OpenSession included (hsm: fatal and recoverable: the HSM
//     recovers in place once the burst has ended).
//   - PINExpired: CKR_PIN_EXPIRED from every operation and login (sessions
//     still open), and C_GetTokenInfo reporting CKF_USER_PIN_TO_BE_CHANGED
//     (hsm: fatal and recoverable, likewise).
//   - Latency: a delay before the call, no error.
//
// # Modes
//
// SetRandom makes each operation call (the Init and the operation of
// sign, encrypt, decrypt and object search, attribute reads, and session
// opening for DeviceError) fail with probability Random.Rate, the kind
// drawn from Random.Kinds, and be delayed with probability
// Random.LatencyRate by up to Random.MaxLatency. StartBurst makes every
// call fail with one kind until StopBurst. Run plays a Schedule of such
// phases. The random draws come from one PCG stream seeded by New's seed
// (SeedFromEnv reads HSMD_FAULT_SEED so that a failing run can be
// replayed): the sequence of decisions is reproducible, while which call
// gets which decision depends on goroutine scheduling.
//
// # Concurrency
//
// An Injector is safe for concurrent use, as the module it wraps is. Wrap
// may be called again (a test restarting the HSM) when no call is in
// flight through the previous module.
package hsmfault

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
)

// Kind is a kind of fault.
type Kind int

// The kinds of fault.
const (
	DeviceError Kind = iota
	SessionInvalid
	TokenNotPresent
	PINExpired
	Latency
	numKinds
)

// Kinds lists every kind, in order.
var Kinds = []Kind{DeviceError, SessionInvalid, TokenNotPresent, PINExpired, Latency}

func (k Kind) String() string {
	switch k {
	case DeviceError:
		return "CKR_DEVICE_ERROR"
	case SessionInvalid:
		return "CKR_SESSION_HANDLE_INVALID"
	case TokenNotPresent:
		return "CKR_TOKEN_NOT_PRESENT"
	case PINExpired:
		return "CKR_PIN_EXPIRED"
	case Latency:
		return "latency"
	}
	return fmt.Sprintf("hsmfault.Kind(%d)", int(k))
}

// rv is the PKCS#11 return value of an error kind.
func (k Kind) rv() pkcs11.Error {
	switch k {
	case DeviceError:
		return pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
	case SessionInvalid:
		return pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)
	case TokenNotPresent:
		return pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT)
	case PINExpired:
		return pkcs11.Error(pkcs11.CKR_PIN_EXPIRED)
	}
	panic("hsmfault: no return value for " + k.String())
}

// Random configures random injection; the zero value injects nothing.
type Random struct {
	// Rate is the probability that an operation call fails.
	Rate float64
	// Kinds are the error kinds drawn (uniformly) for a failing call;
	// default DeviceError and SessionInvalid.
	Kinds []Kind
	// LatencyRate is the probability that a call is delayed, by a
	// duration drawn uniformly from [0, MaxLatency).
	LatencyRate float64
	MaxLatency  time.Duration
}

// EnvSeed is the environment variable SeedFromEnv reads.
const EnvSeed = "HSMD_FAULT_SEED"

// SeedFromEnv returns the seed in HSMD_FAULT_SEED (replay true) or, if it
// is unset, a random one. An unparsable value is an error.
func SeedFromEnv() (seed uint64, replay bool, err error) {
	v := os.Getenv(EnvSeed)
	if v == "" {
		return rand.Uint64(), false, nil
	}
	seed, err = strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, false, fmt.Errorf("hsmfault: %s=%q is not an unsigned decimal", EnvSeed, v)
	}
	return seed, true, nil
}

// Injector is an hsm.Module that injects faults. Make it with New and pass
// Wrap to hsm.OpenWithModuleWrapper.
type Injector struct {
	mod  atomic.Pointer[hsm.Module]
	seed uint64

	mu      sync.Mutex
	rng     *rand.Rand
	random  Random
	burst   Kind
	inBurst bool
	killed  map[pkcs11.SessionHandle]bool // sessions closed by a SessionInvalid fault

	counts    [numKinds]atomic.Int64
	calls     atomic.Int64
	logins    atomic.Int64
	lastFault atomic.Int64 // UnixNano of the last injected error or delay
}

// New returns an Injector whose random draws come from seed. It injects
// nothing until SetRandom, StartBurst or Run.
func New(seed uint64) *Injector {
	return &Injector{
		seed:   seed,
		rng:    rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		killed: map[pkcs11.SessionHandle]bool{},
	}
}

// Seed returns the seed given to New.
func (in *Injector) Seed() uint64 { return in.seed }

// Wrap makes m the module calls are forwarded to and returns in: the
// argument of hsm.OpenWithModuleWrapper.
func (in *Injector) Wrap(m hsm.Module) hsm.Module {
	in.mod.Store(&m)
	return in
}

func (in *Injector) m() hsm.Module { return *in.mod.Load() }

// SetRandom replaces the random injection; Random{} stops it.
func (in *Injector) SetRandom(r Random) {
	if r.Rate > 0 && len(r.Kinds) == 0 {
		r.Kinds = []Kind{DeviceError, SessionInvalid}
	}
	for _, k := range r.Kinds {
		if k == Latency || k < 0 || k >= numKinds {
			panic("hsmfault: Random.Kinds holds " + k.String())
		}
	}
	in.mu.Lock()
	in.random = r
	in.mu.Unlock()
}

// StartBurst makes every call fail with k (an error kind) until StopBurst.
func (in *Injector) StartBurst(k Kind) {
	if k == Latency || k < 0 || k >= numKinds {
		panic("hsmfault: no burst of " + k.String())
	}
	in.mu.Lock()
	in.burst, in.inBurst = k, true
	in.mu.Unlock()
}

// StopBurst ends a burst.
func (in *Injector) StopBurst() {
	in.mu.Lock()
	in.inBurst = false
	in.mu.Unlock()
}

// Stop ends every injection (random and burst).
func (in *Injector) Stop() {
	in.mu.Lock()
	in.random, in.inBurst = Random{}, false
	in.mu.Unlock()
}

// Count returns how many faults of kind k were injected.
func (in *Injector) Count(k Kind) int64 { return in.counts[k].Load() }

// Calls returns how many module calls went through the Injector.
func (in *Injector) Calls() int64 { return in.calls.Load() }

// Logins returns how many C_Login calls went through the Injector, failed
// or injected ones included: a test of PIN handling counts attempts with
// it.
func (in *Injector) Logins() int64 { return in.logins.Load() }

// LastFault returns when the last fault was injected, or for a delay when
// it ended (zero if none was).
func (in *Injector) LastFault() time.Time {
	n := in.lastFault.Load()
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// Phase is one step of a Schedule: for For, inject Random, or a burst of
// Burst if Random is zero and Burst is set.
type Phase struct {
	Name   string
	For    time.Duration
	Random Random
	Burst  *Kind
}

// Schedule is a sequence of phases.
type Schedule []Phase

// Run plays s, calling onPhase (if not nil) as each phase starts, and
// stops all injection when it ends or ctx is done (returning ctx.Err()).
func (in *Injector) Run(ctx context.Context, s Schedule, onPhase func(Phase)) error {
	defer in.Stop()
	for _, p := range s {
		in.Stop()
		if p.Burst != nil {
			in.StartBurst(*p.Burst)
		} else {
			in.SetRandom(p.Random)
		}
		if onPhase != nil {
			onPhase(p)
		}
		t := time.NewTimer(p.For)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	return nil
}

// call classes: what a call is eligible for.
type class int

const (
	classOp      class = iota // session operations: random faults, bursts
	classOpen                 // C_OpenSession: random DeviceError, bursts
	classToken                // slot and token queries: bursts only
	classSession              // login, logout: TokenNotPresent bursts only
)

// decide draws the fault for one call: an error kind (if fail) and a
// delay.
func (in *Injector) decide(c class) (k Kind, fail bool, delay time.Duration) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.inBurst {
		switch {
		case in.burst == TokenNotPresent:
			return in.burst, true, 0 // nothing answers
		case in.burst == PINExpired && (c == classOp || c == classSession):
			return in.burst, true, 0 // sessions open; nothing runs in them
		case c == classOp || c == classOpen:
			return in.burst, true, 0
		}
		return 0, false, 0
	}
	r := in.random
	if r.LatencyRate > 0 && r.MaxLatency > 0 && in.rng.Float64() < r.LatencyRate {
		delay = time.Duration(in.rng.Int64N(int64(r.MaxLatency)))
	}
	if r.Rate > 0 && (c == classOp || c == classOpen) && in.rng.Float64() < r.Rate {
		k = r.Kinds[in.rng.IntN(len(r.Kinds))]
		if c == classOp || k == DeviceError {
			return k, true, delay
		}
	}
	return 0, false, delay
}

// before runs the injection for one call on session s (0: no session) and
// returns the error to answer instead of calling the module, or nil.
func (in *Injector) before(c class, s pkcs11.SessionHandle) error {
	in.calls.Add(1)
	k, fail, delay := in.decide(c)
	if delay > 0 {
		time.Sleep(delay)
		in.note(Latency) // the fault lasts until the delay ends
	}
	if !fail {
		return nil
	}
	in.note(k)
	if k == SessionInvalid && s != 0 {
		// Lose the session for real: the module closes it.
		if err := in.m().CloseSession(s); err == nil {
			in.mu.Lock()
			in.killed[s] = true
			in.mu.Unlock()
		}
	}
	return k.rv()
}

func (in *Injector) note(k Kind) {
	in.counts[k].Add(1)
	in.lastFault.Store(time.Now().UnixNano())
}

// The hsm.Module methods.

func (in *Injector) GetSlotList(tokenPresent bool) ([]uint, error) {
	if err := in.before(classToken, 0); err != nil {
		return nil, err
	}
	return in.m().GetSlotList(tokenPresent)
}

func (in *Injector) GetTokenInfo(slotID uint) (pkcs11.TokenInfo, error) {
	if err := in.before(classToken, 0); err != nil {
		return pkcs11.TokenInfo{}, err
	}
	ti, err := in.m().GetTokenInfo(slotID)
	in.mu.Lock()
	expired := in.inBurst && in.burst == PINExpired
	in.mu.Unlock()
	if err == nil && expired {
		ti.Flags |= pkcs11.CKF_USER_PIN_TO_BE_CHANGED
	}
	return ti, err
}

func (in *Injector) OpenSession(slotID uint, flags uint) (pkcs11.SessionHandle, error) {
	if err := in.before(classOpen, 0); err != nil {
		return 0, err
	}
	s, err := in.m().OpenSession(slotID, flags)
	if err == nil {
		in.mu.Lock()
		delete(in.killed, s) // a reused handle number is a live session again
		in.mu.Unlock()
	}
	return s, err
}

func (in *Injector) CloseSession(sh pkcs11.SessionHandle) error {
	in.calls.Add(1)
	in.mu.Lock()
	gone := in.killed[sh]
	delete(in.killed, sh)
	in.mu.Unlock()
	if gone {
		return pkcs11.Error(pkcs11.CKR_SESSION_HANDLE_INVALID)
	}
	return in.m().CloseSession(sh)
}

func (in *Injector) Login(sh pkcs11.SessionHandle, userType uint, pin string) error {
	in.logins.Add(1)
	if err := in.before(classSession, sh); err != nil {
		return err
	}
	return in.m().Login(sh, userType, pin)
}

func (in *Injector) Logout(sh pkcs11.SessionHandle) error {
	in.calls.Add(1)
	return in.m().Logout(sh)
}

func (in *Injector) FindObjectsInit(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) error {
	if err := in.before(classOp, sh); err != nil {
		return err
	}
	return in.m().FindObjectsInit(sh, temp)
}

func (in *Injector) FindObjects(sh pkcs11.SessionHandle, max int) ([]pkcs11.ObjectHandle, bool, error) {
	if err := in.before(classOp, sh); err != nil {
		return nil, false, err
	}
	return in.m().FindObjects(sh, max)
}

func (in *Injector) FindObjectsFinal(sh pkcs11.SessionHandle) error {
	in.calls.Add(1)
	return in.m().FindObjectsFinal(sh)
}

func (in *Injector) GetAttributeValue(sh pkcs11.SessionHandle, o pkcs11.ObjectHandle, a []*pkcs11.Attribute) ([]*pkcs11.Attribute, error) {
	if err := in.before(classOp, sh); err != nil {
		return nil, err
	}
	return in.m().GetAttributeValue(sh, o, a)
}

func (in *Injector) GenerateKey(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if err := in.before(classOp, sh); err != nil {
		return 0, err
	}
	return in.m().GenerateKey(sh, m, temp)
}

func (in *Injector) GenerateKeyPair(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, public, private []*pkcs11.Attribute) (pkcs11.ObjectHandle, pkcs11.ObjectHandle, error) {
	if err := in.before(classOp, sh); err != nil {
		return 0, 0, err
	}
	return in.m().GenerateKeyPair(sh, m, public, private)
}

func (in *Injector) CreateObject(sh pkcs11.SessionHandle, temp []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	if err := in.before(classOp, sh); err != nil {
		return 0, err
	}
	return in.m().CreateObject(sh, temp)
}

func (in *Injector) DestroyObject(sh pkcs11.SessionHandle, oh pkcs11.ObjectHandle) error {
	if err := in.before(classOp, sh); err != nil {
		return err
	}
	return in.m().DestroyObject(sh, oh)
}

func (in *Injector) SignInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := in.before(classOp, sh); err != nil {
		return err
	}
	return in.m().SignInit(sh, m, o)
}

func (in *Injector) Sign(sh pkcs11.SessionHandle, message []byte) ([]byte, error) {
	if err := in.before(classOp, sh); err != nil {
		return nil, err
	}
	return in.m().Sign(sh, message)
}

func (in *Injector) EncryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := in.before(classOp, sh); err != nil {
		return err
	}
	return in.m().EncryptInit(sh, m, o)
}

func (in *Injector) Encrypt(sh pkcs11.SessionHandle, message []byte) ([]byte, error) {
	if err := in.before(classOp, sh); err != nil {
		return nil, err
	}
	return in.m().Encrypt(sh, message)
}

func (in *Injector) DecryptInit(sh pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	if err := in.before(classOp, sh); err != nil {
		return err
	}
	return in.m().DecryptInit(sh, m, o)
}

func (in *Injector) Decrypt(sh pkcs11.SessionHandle, cipher []byte) ([]byte, error) {
	if err := in.before(classOp, sh); err != nil {
		return nil, err
	}
	return in.m().Decrypt(sh, cipher)
}

var _ hsm.Module = (*Injector)(nil)
