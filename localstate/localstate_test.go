package localstate_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
	"github.com/hsmd/hsmd/store/storetest"
	"github.com/hsmd/hsmd/tpm"
	"github.com/hsmd/hsmd/tpm/tpmtest"
)

// providers runs f against swtpm and the in-process simulator.
func providers(t *testing.T, f func(t *testing.T, cfg tpm.Config, sw *tpmtest.Swtpm)) {
	t.Run("swtpm", func(t *testing.T) {
		sw := tpmtest.StartSwtpm(t)
		f(t, sw.Config(), sw)
	})
	t.Run("simulator", func(t *testing.T) { f(t, tpmtest.SimulatorConfig(42), nil) })
}

func openTPM(t *testing.T, cfg tpm.Config) *tpm.TPM {
	t.Helper()
	tp, err := tpm.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if n, err := tp.TransientHandles(context.Background()); err == nil && n != 0 {
			t.Errorf("%d transient TPM handles left", n)
		}
		tp.Close()
	})
	return tp
}

func openStore(t *testing.T, dir string, s store.Sealer) *bolt.Store {
	t.Helper()
	st, err := bolt.Open(filepath.Join(dir, "hsmd.db"), bolt.Options{Sealer: s})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// initDir initialises a data dir: sealed secrets and a sealed store.
func initDir(t *testing.T, tp *tpm.TPM) (string, *localstate.Secrets, uint64) {
	t.Helper()
	dir := t.TempDir()
	sec, n, err := localstate.Init(context.Background(), tp, dir, []byte("1234-user-pin"))
	if err != nil {
		t.Fatal(err)
	}
	st := openStore(t, dir, sec)
	if err := st.Reseal(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	st.Close()
	return dir, sec, n
}

func TestSealAndUnseal(t *testing.T) {
	providers(t, func(t *testing.T, cfg tpm.Config, sw *tpmtest.Swtpm) {
		tp := openTPM(t, cfg)
		dir, sec, _ := initDir(t, tp)
		got, err := localstate.Unseal(context.Background(), tp, dir)
		if err != nil {
			t.Fatal(err)
		}
		pin, _ := got.PIN()
		if string(pin) != "1234-user-pin" || got.MAC([]byte("x")) != sec.MAC([]byte("x")) {
			t.Fatal("unsealed other secrets")
		}
		if _, _, err := localstate.Init(context.Background(), tp, dir, []byte("x")); !errors.Is(err, localstate.ErrInitialized) {
			t.Fatalf("second init: %v", err)
		}
		if sw != nil { // a power cycle keeps unseal working
			tp.Close()
			sw.Restart()
			tp = openTPM(t, cfg)
			if _, err := localstate.Unseal(context.Background(), tp, dir); err != nil {
				t.Fatalf("after a power cycle: %v", err)
			}
		}
		if err := tp.ExtendPCR(context.Background(), tp.Info().PCRs[0], []byte("a new boot loader")); err != nil {
			t.Fatal(err)
		}
		if _, err := localstate.Unseal(context.Background(), tp, dir); !errors.Is(err, tpm.ErrPCRMismatch) {
			t.Fatalf("unseal after a PCR extend: %v, want ErrPCRMismatch", err)
		}
	})
}

func TestRollbackAndEditsAreRefused(t *testing.T) {
	providers(t, func(t *testing.T, cfg tpm.Config, _ *tpmtest.Swtpm) {
		ctx := context.Background()
		tp := openTPM(t, cfg)
		dir, sec, n := initDir(t, tp)
		st := openStore(t, dir, sec)
		if got, err := localstate.Check(ctx, tp, st); err != nil || got != n {
			t.Fatalf("check of a fresh dir: %d, %v", got, err)
		}
		st.Close()
		earlier := copyDir(t, dir)

		st = openStore(t, dir, sec)
		c := localstate.NewCounter(tp, st, n)
		if _, err := c.Advance(ctx); err != nil {
			t.Fatal(err)
		}
		st.Close()

		old := openStore(t, earlier, sec)
		var rb *localstate.RollbackError
		if _, err := localstate.Check(ctx, tp, old); !errors.As(err, &rb) || rb.Store != n || rb.TPM != n+1 {
			t.Fatalf("check of an earlier copy: %v", err)
		}
		old.Close()

		// An interrupted advance (store bound, TPM not incremented) is completed.
		st = openStore(t, dir, sec)
		if err := st.SetCounter(ctx, n+2); err != nil {
			t.Fatal(err)
		}
		if got, err := localstate.Check(ctx, tp, st); err != nil || got != n+2 {
			t.Fatalf("check after an interrupted advance: %d, %v", got, err)
		}
		// Three ahead is not a crash.
		if err := st.SetCounter(ctx, n+5); err != nil {
			t.Fatal(err)
		}
		var ah *localstate.AheadError
		if _, err := localstate.Check(ctx, tp, st); !errors.As(err, &ah) {
			t.Fatalf("check of a store ahead: %v", err)
		}
		// A store sealed with another state key (another init): tampered.
		if _, err := localstate.Check(ctx, tp, openStore(t, earlier, storetest.HMACSealer("another key"))); !errors.Is(err, store.ErrTampered) {
			t.Fatalf("check with another state key: %v", err)
		}
	})
}

// TestOfflineEditIsRefused: a tenant record changed in the file, with the
// TPM's secrets intact, fails Check naming the tenant.
func TestOfflineEditIsRefused(t *testing.T) {
	providers(t, func(t *testing.T, cfg tpm.Config, _ *tpmtest.Swtpm) {
		ctx := context.Background()
		tp := openTPM(t, cfg)
		dir, sec, _ := initDir(t, tp)
		st := openStore(t, dir, sec)
		tn := &store.Tenant{Name: "acme", ID: 7, Current: 1, Versions: []store.KeyVersion{
			{Version: 1, KDKVersion: 1, State: store.StateEnabled, Salt: bytes.Repeat([]byte{1}, store.SaltSize)}}}
		if err := st.CreateTenant(ctx, tn); err != nil {
			t.Fatal(err)
		}
		st.Close()
		db, err := bbolt.Open(filepath.Join(dir, "hsmd.db"), 0o600, &bbolt.Options{Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		db.Update(func(tx *bbolt.Tx) error {
			b := tx.Bucket([]byte("tenants"))
			return b.Put([]byte("acme"), bytes.Replace(b.Get([]byte("acme")), []byte(`"current":1`), []byte(`"current":2`), 1))
		})
		db.Close()
		sec2, err := localstate.Unseal(ctx, tp, dir)
		if err != nil {
			t.Fatal(err)
		}
		_, err = localstate.Check(ctx, tp, openStore(t, dir, sec2))
		if !errors.Is(err, store.ErrTampered) || !strings.Contains(err.Error(), `tenant "acme"`) {
			t.Fatalf("check after an offline edit: %v", err)
		}
	})
}

func copyDir(t *testing.T, dir string) string {
	t.Helper()
	dst := t.TempDir()
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if fi.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

func TestSecretsPrintNothing(t *testing.T) {
	var s localstate.Secrets
	if got := s.String(); got != "localstate.Secrets{REDACTED}" {
		t.Fatal(got)
	}
}

// lostReply increments the TPM's counter but reports a failure, as a reply
// lost on the wire (or a caller's cancellation after the command) would.
type lostReply struct{ *tpm.TPM }

func (l lostReply) IncrementCounter(ctx context.Context) (uint64, error) {
	l.TPM.IncrementCounter(ctx)
	return 0, errors.New("reply lost")
}

// TestAdvanceCatchesUpWithALostIncrement: the store is bound to the TPM's
// value, so the next start does not see a rollback.
func TestAdvanceCatchesUpWithALostIncrement(t *testing.T) {
	providers(t, func(t *testing.T, cfg tpm.Config, _ *tpmtest.Swtpm) {
		ctx := context.Background()
		tp := openTPM(t, cfg)
		dir, sec, n := initDir(t, tp)
		st := openStore(t, dir, sec)
		c := localstate.NewCounter(lostReply{tp}, st, n)
		got, err := c.Advance(ctx)
		if err != nil || got != n+1 {
			t.Fatalf("advance with a lost reply: %d, %v", got, err)
		}
		if got, err := localstate.Check(ctx, tp, st); err != nil || got != n+1 {
			t.Fatalf("check after the lost reply: %d, %v", got, err)
		}
	})
}
