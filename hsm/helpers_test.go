package hsm_test

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/softhsm"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

func testConfig(tok softhsm.TestToken) hsm.Config {
	return hsm.Config{
		Module:      tok.Module,
		TokenLabel:  tok.Label,
		PINFile:     tok.PINFile,
		Sessions:    2,
		CallTimeout: 5 * time.Second,
	}
}

// openHSM opens cfg and registers a Close that checks for leaked sessions
// and that a second Close is harmless.
func openHSM(t *testing.T, cfg hsm.Config, wrap func(hsm.Module) hsm.Module) *hsm.HSM {
	t.Helper()
	h, err := hsm.OpenWithModuleWrapper(context.Background(), cfg, wrap)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { checkedClose(t, h) })
	return h
}

func checkedClose(t *testing.T, h *hsm.HSM) {
	t.Helper()
	if err := h.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if n := h.OpenSessions(); n != 0 {
		t.Errorf("OpenSessions after Close = %d, want 0", n)
	}
}

// newKeyedHSM makes a fresh token, opens it and creates the root keys.
func newKeyedHSM(t *testing.T) (*hsm.HSM, softhsm.TestToken) {
	t.Helper()
	tok := softhsm.NewTestToken(t)
	h := openHSM(t, testConfig(tok), nil)
	if err := h.InitKeys(context.Background()); err != nil {
		t.Fatalf("InitKeys: %v", err)
	}
	return h, tok
}

// faultModule injects errors and delays into SignInit (before the real
// operation starts, so the real session is left clean).
type faultModule struct {
	hsm.Module
	mu      sync.Mutex
	errs    []error       // returned by the next SignInit calls, in order
	block   chan struct{} // if set, SignInit waits until it is closed
	entered chan struct{} // if set, receives a value when SignInit blocks
}

func (f *faultModule) failNext(rv uint) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errs = append(f.errs, pkcs11.Error(rv))
}

func (f *faultModule) SignInit(s pkcs11.SessionHandle, m []*pkcs11.Mechanism, o pkcs11.ObjectHandle) error {
	f.mu.Lock()
	var err error
	if len(f.errs) > 0 {
		err, f.errs = f.errs[0], f.errs[1:]
	}
	block, entered := f.block, f.entered
	f.mu.Unlock()
	if block != nil {
		if entered != nil {
			entered <- struct{}{}
		}
		<-block
	}
	if err != nil {
		return err
	}
	return f.Module.SignInit(s, m, o)
}

// openFaulty opens a keyed token through a faultModule.
func openFaulty(t *testing.T, tok softhsm.TestToken, cfg hsm.Config) (*hsm.HSM, *faultModule) {
	t.Helper()
	f := &faultModule{}
	h := openHSM(t, cfg, func(m hsm.Module) hsm.Module { f.Module = m; return f })
	if err := h.LoadKeys(context.Background()); err != nil {
		t.Fatalf("LoadKeys: %v", err)
	}
	return h, f
}
