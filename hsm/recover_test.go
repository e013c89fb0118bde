package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/hsmfault"
	"github.com/hsmd/hsmd/internal/testutil"
	"github.com/hsmd/hsmd/softhsm"
)

// In-place recovery (hsm doc, "Recovery"), on real SoftHSM tokens through
// internal/hsmfault or small wrappers of the real module.

// keyedToken makes a token with root keys and closes the HSM that made
// them, so that the test's HSM is the token's only user in the process
// (its login ends with its last session, as after a token removal).
func keyedToken(t *testing.T) softhsm.TestToken {
	t.Helper()
	tok := softhsm.NewTestToken(t)
	h := openHSM(t, testConfig(tok), nil)
	if err := h.InitKeys(context.Background()); err != nil {
		t.Fatalf("InitKeys: %v", err)
	}
	checkedClose(t, h)
	return tok
}

// logTo returns a logger writing text lines to buf at every level.
func logTo(buf *testutil.SyncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// checkLogs fails if logs hold the token's PIN or lack any of want.
func checkLogs(t *testing.T, logs string, tok softhsm.TestToken, want ...string) {
	t.Helper()
	if strings.Contains(logs, string(tok.UserPIN)) {
		t.Fatal("the log holds the PIN")
	}
	for _, w := range want {
		if !strings.Contains(logs, w) {
			t.Errorf("the log lacks %q:\n%s", w, logs)
		}
	}
}

// waitUntil polls cond every 5ms until it holds or within has passed.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// answers are results computed before a fault, which every later answer
// must equal.
type answers struct {
	msgs   [][]byte
	prf    [][]byte // PRF(kdk v1, msgs[i])
	plain  [][]byte
	sealed [][]byte // WrapSeal(plain[i])
	signer crypto.Signer
}

var wrapAAD = []byte("hsm recover test")

func recordAnswers(t *testing.T, h *hsm.HSM) *answers {
	t.Helper()
	ctx := context.Background()
	a := &answers{}
	for i := range 4 {
		msg := fmt.Appendf(nil, "recover-msg-%d", i)
		out, err := h.PRF(ctx, 1, msg)
		if err != nil {
			t.Fatal(err)
		}
		pt := fmt.Appendf(nil, "recover-plain-%d", i)
		ct, err := h.WrapSeal(ctx, pt, wrapAAD)
		if err != nil {
			t.Fatal(err)
		}
		a.msgs, a.prf = append(a.msgs, msg), append(a.prf, out)
		a.plain, a.sealed = append(a.plain, pt), append(a.sealed, ct)
	}
	var err error
	if a.signer, err = h.Signer(ctx, hsm.Ed25519); err != nil {
		t.Fatal(err)
	}
	return a
}

// load runs PRF, WrapOpen and Ed25519 signing on an HSM from several
// goroutines and checks every answer against answers.
type load struct {
	ok, failed, wrong atomic.Int64
	lastOK            atomic.Int64 // UnixNano of the last success
	note              sync.Map     // first message of each wrong answer
	stop              chan struct{}
	wg                sync.WaitGroup
}

func startLoad(h *hsm.HSM, a *answers, workers int) *load {
	l := &load{stop: make(chan struct{})}
	for w := range workers {
		l.wg.Go(func() {
			for i := w; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				if err := l.call(h, a, i); err != nil {
					l.failed.Add(1)
					time.Sleep(time.Millisecond) // calls fail fast: do not spin
				} else {
					l.ok.Add(1)
					l.lastOK.Store(time.Now().UnixNano())
				}
			}
		})
	}
	return l
}

func (l *load) wrongAnswer(msg string) {
	l.wrong.Add(1)
	l.note.LoadOrStore(msg, true)
}

// call makes one call; it returns an error for a failure an HSM fault
// explains, and records a wrong answer otherwise.
func (l *load) call(h *hsm.HSM, a *answers, i int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	j := i % len(a.msgs)
	switch i % 3 {
	case 0:
		out, err := h.PRF(ctx, 1, a.msgs[j])
		if err == nil && !bytes.Equal(out, a.prf[j]) {
			l.wrongAnswer("PRF returned another output")
		}
		return err
	case 1:
		pt, err := h.WrapOpen(ctx, a.sealed[j], wrapAAD)
		switch {
		case err == nil && !bytes.Equal(pt, a.plain[j]):
			l.wrongAnswer("WrapOpen returned another plaintext")
		case err == hsm.ErrWrapOpen: // exactly: an authentication failure
			l.wrongAnswer("WrapOpen refused a genuine blob as inauthentic")
			return nil
		}
		return err
	}
	msg := a.msgs[j]
	s, err := a.signer.Sign(nil, msg, crypto.Hash(0))
	if err == nil && !ed25519.Verify(a.signer.Public().(ed25519.PublicKey), msg, s) {
		l.wrongAnswer("a signature does not verify")
	}
	return err
}

func (l *load) halt(t *testing.T) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	l.note.Range(func(k, _ any) bool {
		t.Errorf("wrong answer: %v", k)
		return true
	})
}

// testRecoverUnderLoad injects kind for window under load and checks that
// readiness goes down at once and comes back by itself after the
// hold-down, that no answer is wrong, and that recovery logged in once.
// A hold-down other than the default is set with the test hook, with a
// maximum backoff of twice that.
func testRecoverUnderLoad(t *testing.T, kind hsmfault.Kind, window, holdDown time.Duration) hsm.RecoveryStats {
	ctx := context.Background()
	tok := keyedToken(t)
	var logs testutil.SyncBuffer
	c := testConfig(tok)
	c.Sessions, c.Logger = 3, logTo(&logs)
	if holdDown != hsm.DefaultRecoveryHoldDown {
		c = hsm.WithTestRecoveryTimings(c, holdDown, 2*holdDown)
	}
	in := hsmfault.New(11)
	h := openHSM(t, c, in.Wrap)
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	a := recordAnswers(t, h)
	l := startLoad(h, a, 4)
	time.Sleep(100 * time.Millisecond)

	logins := in.Logins()
	start := time.Now()
	in.StartBurst(kind)
	waitUntil(t, time.Second, "Ready fatal in the fault", func() bool { return hsm.IsFatal(h.Ready(ctx)) })
	down := time.Since(start)
	time.Sleep(window - down)
	in.StopBurst()
	end := time.Now()
	if err := h.Ready(ctx); !hsm.IsFatal(err) && time.Since(start) < holdDown {
		t.Fatalf("Ready right after the fault, within the hold-down = %v, want fatal", err)
	}
	waitUntil(t, holdDown+window+5*time.Second, "recovery", func() bool { return h.Ready(ctx) == nil })
	up := time.Now()
	st := h.Recoveries()
	t.Logf("%v for %v: Ready down after %v; ready again %v after the fault began, %v after it ended; %+v",
		kind, window, down.Round(time.Microsecond), up.Sub(start).Round(time.Millisecond), up.Sub(end).Round(time.Millisecond), st)
	time.Sleep(200 * time.Millisecond) // load on the recovered HSM
	l.halt(t)
	t.Logf("calls: %d ok, %d failed, %d wrong answers", l.ok.Load(), l.failed.Load(), l.wrong.Load())

	if l.failed.Load() == 0 || l.ok.Load() == 0 {
		t.Errorf("%d calls failed and %d succeeded; want both", l.failed.Load(), l.ok.Load())
	}
	if time.Unix(0, l.lastOK.Load()).Before(up) {
		t.Error("no call succeeded after recovery")
	}
	if st.Recoveries != 1 || st.Down || st.Last < holdDown || st.Last > up.Sub(start) {
		t.Errorf("Recoveries() = %+v after one outage of %v with a hold-down of %v", st, up.Sub(start), holdDown)
	}
	if st.Last > holdDown+window+3*time.Second {
		t.Errorf("recovery took %v, want under the hold-down %v + the fault %v + 3s", st.Last, holdDown, window)
	}
	if n := in.Logins() - logins; n != 1 {
		t.Errorf("%d logins to recover, want 1", n)
	}
	if n := h.OpenSessions(); n != c.Sessions {
		t.Errorf("OpenSessions = %d after recovery, want the pool's %d", n, c.Sessions)
	}
	checkLogs(t, logs.String(), tok, "token unusable; recovering", "class=recoverable", "recovered; the token is usable again", "attempt=")
	return st
}

// TestRecoverTokenNotPresent: the token gone for 300ms under load, with the
// default timings: down at once, back by itself after the 1s hold-down.
func TestRecoverTokenNotPresent(t *testing.T) {
	testRecoverUnderLoad(t, hsmfault.TokenNotPresent, 300*time.Millisecond, hsm.DefaultRecoveryHoldDown)
}

// TestRecoverPINExpired: the PIN expired (logins and operations refused,
// the token flagged) for longer than the hold-down: attempts in the fault
// fail without a login, back off, and the first one after it recovers.
func TestRecoverPINExpired(t *testing.T) {
	st := testRecoverUnderLoad(t, hsmfault.PINExpired, 700*time.Millisecond, 150*time.Millisecond)
	if st.Attempts < 2 {
		t.Errorf("%d recovery attempts in a fault longer than the hold-down, want at least 2", st.Attempts)
	}
}

// TestRecoverWrongPINStaysFatal: the token comes back but the PIN file now
// holds a wrong PIN: recovery tries it once, gives up for good, and no
// later call or probe reaches the module.
func TestRecoverWrongPINStaysFatal(t *testing.T) {
	ctx := context.Background()
	tok := keyedToken(t)
	var logs testutil.SyncBuffer
	c := hsm.WithTestRecoveryTimings(testConfig(tok), 50*time.Millisecond, 100*time.Millisecond)
	c.Logger = logTo(&logs)
	in := hsmfault.New(12)
	h := openHSM(t, c, in.Wrap)
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	const wrong = "wrong-pin-0123456789"
	if err := os.WriteFile(tok.PINFile, []byte(wrong+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	logins := in.Logins()
	in.StartBurst(hsmfault.TokenNotPresent)
	if err := h.Ready(ctx); !hsm.IsFatal(err) {
		t.Fatalf("Ready with the token gone = %v, want fatal", err)
	}
	in.StopBurst()
	waitUntil(t, 3*time.Second, "recovery giving up", func() bool { st := h.Recoveries(); return st.Down && !st.Recovering })
	time.Sleep(500 * time.Millisecond) // several backoff periods
	if n := in.Logins() - logins; n != 1 {
		t.Fatalf("%d logins with a wrong PIN, want 1", n)
	}
	calls := in.Calls()
	err := h.Ready(ctx)
	if !hsm.IsFatal(err) || !errors.Is(err, hsm.ErrLogin) || !errors.Is(err, pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)) {
		t.Fatalf("Ready after recovery met a wrong PIN = %v, want fatal ErrLogin CKR_PIN_INCORRECT", err)
	}
	if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsFatal(err) {
		t.Fatalf("PRF = %v, want fatal", err)
	}
	if in.Calls() != calls {
		t.Fatal("a call on the permanently fatal HSM reached the module")
	}
	t.Logf("Ready: %v; %+v", err, h.Recoveries())
	checkLogs(t, logs.String(), tok, "class=permanent", "recovery gave up")
	if strings.Contains(logs.String(), wrong) {
		t.Fatal("the log holds the wrong PIN")
	}
}

// TestPermanentFaultsNeverLogIn: a locked PIN, or a recoverable fault when
// the PIN came from a descriptor (it cannot be read again), is fatal for
// good at once: no recovery runs and no login is tried.
func TestPermanentFaultsNeverLogIn(t *testing.T) {
	for _, tc := range []struct {
		name string
		rv   uint
		fd   bool
	}{
		{"pin locked", pkcs11.CKR_PIN_LOCKED, false},
		{"pin incorrect", pkcs11.CKR_PIN_INCORRECT, false},
		{"token gone, pin from fd", pkcs11.CKR_TOKEN_NOT_PRESENT, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			tok := keyedToken(t)
			var logs testutil.SyncBuffer
			c := hsm.WithTestRecoveryTimings(testConfig(tok), 50*time.Millisecond, 100*time.Millisecond)
			c.Logger = logTo(&logs)
			if tc.fd {
				r, w, err := os.Pipe()
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
				w.Write(append(tok.UserPIN, '\n'))
				w.Close()
				if c.PINFD, err = dupFD(r); err != nil {
					t.Fatal(err)
				}
				c.PINFile = ""
			}
			h, m := openHooked(t, c)
			m.signInitErr.Store(uint64(tc.rv))
			if _, err := h.PRF(ctx, 1, []byte("x")); !hsm.IsFatal(err) {
				t.Fatalf("PRF with 0x%x = %v, want fatal", tc.rv, err)
			}
			m.signInitErr.Store(0)
			time.Sleep(400 * time.Millisecond) // several hold-downs
			if st := h.Recoveries(); !st.Down || st.Recovering || st.Attempts != 0 {
				t.Fatalf("Recoveries() = %+v, want down for good without attempts", st)
			}
			if n := m.logins.Load(); n != 0 {
				t.Fatalf("%d logins after a permanent fault, want none", n)
			}
			if err := h.Ready(ctx); !hsm.IsFatal(err) {
				t.Fatalf("Ready = %v, want fatal", err)
			}
			checkLogs(t, logs.String(), tok, "class=permanent")
		})
	}
}

// impostor presents another real token under the label of the HSM's
// token (hidden under another label) when armed; serial, if set, is the
// serial number it reports for the other token.
type impostor struct {
	hsm.Module
	mu         sync.Mutex
	armed      bool
	ours, them uint   // slots
	label      string // the HSM's token label
	serial     string
}

func (m *impostor) set(armed bool, serial string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.armed, m.serial = armed, serial
}

func (m *impostor) GetTokenInfo(slot uint) (pkcs11.TokenInfo, error) {
	ti, err := m.Module.GetTokenInfo(slot)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil || !m.armed {
		return ti, err
	}
	switch slot {
	case m.ours:
		ti.Label = "elsewhere"
	case m.them:
		ti.Label = m.label
		if m.serial != "" {
			ti.SerialNumber = m.serial
		}
	}
	return ti, err
}

// slotOf returns the slot and serial number of the token labelled label.
func slotOf(t *testing.T, m hsm.Module, label string) (uint, string) {
	t.Helper()
	slots, err := m.GetSlotList(true)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range slots {
		if ti, err := m.GetTokenInfo(s); err == nil && ti.Label == label {
			return s, ti.SerialNumber
		}
	}
	t.Fatalf("no token %q", label)
	return 0, ""
}

// TestRecoverRefusesOtherToken: another token (with the same PIN and its
// own hsmd keys) appears under the token's label: Ready notices, and
// recovery refuses it, first by its serial number, then, when it even
// shows the right serial number, by its keys; it recovers once the right
// token is back, with the same answers.
func TestRecoverRefusesOtherToken(t *testing.T) {
	ctx := context.Background()
	tok := keyedToken(t)
	other := softhsm.TestToken{Module: tok.Module, Label: tok.Label + "-b", PINFile: tok.PINFile, UserPIN: tok.UserPIN}
	if err := softhsm.InitToken(tok.Module, other.Label, []byte("so-pin-0123456789"), tok.UserPIN); err != nil {
		t.Fatal(err)
	}
	hb := openHSM(t, testConfig(other), nil)
	if err := hb.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	checkedClose(t, hb)

	var logs testutil.SyncBuffer
	c := hsm.WithTestRecoveryTimings(testConfig(tok), 50*time.Millisecond, 100*time.Millisecond)
	c.Logger = logTo(&logs)
	m := &impostor{label: tok.Label}
	h := openHSM(t, c, func(mod hsm.Module) hsm.Module { m.Module = mod; return m })
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	want, err := h.PRF(ctx, 1, []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	var serial string
	m.ours, serial = slotOf(t, m.Module, tok.Label)
	m.them, _ = slotOf(t, m.Module, other.Label)

	start := time.Now()
	m.set(true, "")
	if err := h.Ready(ctx); !hsm.IsFatal(err) || !errors.Is(err, pkcs11.Error(pkcs11.CKR_TOKEN_NOT_RECOGNIZED)) {
		t.Fatalf("Ready with another token under the label = %v, want fatal CKR_TOKEN_NOT_RECOGNIZED", err)
	}
	waitUntil(t, 3*time.Second, "two refusals by serial number", func() bool { return h.Recoveries().Attempts >= 2 })
	if err := h.Ready(ctx); !hsm.IsFatal(err) || !strings.Contains(err.Error(), "refusing a different token") {
		t.Fatalf("Ready while the other token is refused = %v", err)
	}

	m.set(true, serial)
	n := h.Recoveries().Attempts
	waitUntil(t, 3*time.Second, "two refusals by keys", func() bool { return h.Recoveries().Attempts >= n+2 })
	if err := h.Ready(ctx); !hsm.IsFatal(err) || !strings.Contains(err.Error(), "keys differ") {
		t.Fatalf("Ready while the other token's keys are refused = %v", err)
	}
	if st := h.Recoveries(); !st.Recovering {
		t.Fatalf("Recoveries() = %+v: a refused token must not stop recovery", st)
	}

	m.set(false, "")
	waitUntil(t, 3*time.Second, "recovery with the right token back", func() bool { return h.Ready(ctx) == nil })
	t.Logf("ready again %v after the other token appeared; %+v", time.Since(start).Round(time.Millisecond), h.Recoveries())
	if got, err := h.PRF(ctx, 1, []byte("x")); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("PRF after recovery = %x, %v; want %x", got, err, want)
	}
	if n := h.OpenSessions(); n != c.Sessions {
		t.Fatalf("OpenSessions = %d, want %d: the refused attempts left sessions open", n, c.Sessions)
	}
	checkLogs(t, logs.String(), tok, "class=refused", "refusing a different token", "keys differ", "recovered; the token is usable again")
}

// TestRecoverModuleReinitialized: the module is finalized under the HSM
// (as by a careless library in the process): calls fail with
// CKR_CRYPTOKI_NOT_INITIALIZED, and recovery initializes the module again,
// logs in and finds the same keys (with new handles).
func TestRecoverModuleReinitialized(t *testing.T) {
	ctx := context.Background()
	tok := keyedToken(t)
	c := hsm.WithTestRecoveryTimings(testConfig(tok), 50*time.Millisecond, 100*time.Millisecond)
	h := openHSM(t, c, nil)
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	a := recordAnswers(t, h)
	mod, release, err := hsm.LoadModule(tok.Module)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if err := mod.Finalize(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.PRF(ctx, 1, a.msgs[0]); !hsm.IsFatal(err) || !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)) {
		t.Fatalf("PRF with the module finalized = %v, want fatal CKR_CRYPTOKI_NOT_INITIALIZED", err)
	}
	waitUntil(t, 3*time.Second, "recovery", func() bool { return h.Ready(ctx) == nil })
	t.Logf("%+v", h.Recoveries())
	l := &load{}
	for i := range 6 {
		if err := l.call(h, a, i); err != nil {
			t.Fatalf("call %d after recovery: %v", i, err)
		}
	}
	if l.wrong.Load() != 0 {
		t.Fatal("a wrong answer after the module was initialized again")
	}
}
