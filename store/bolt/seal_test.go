package bolt_test

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

	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
	"github.com/hsmd/hsmd/store/storetest"
)

func openSealed(t *testing.T, dir string, s store.Sealer) store.Sealed {
	t.Helper()
	st, err := bolt.Open(filepath.Join(dir, "hsmd.db"), bolt.Options{Sealer: s})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func TestSealedConformance(t *testing.T) { storetest.RunSealed(t, openSealed) }

var testKey = storetest.HMACSealer("0123456789abcdef0123456789abcdef")

// sealedWith makes a sealed store holding the named tenants.
func sealedWith(t *testing.T, names ...string) string {
	dir := t.TempDir()
	s := openSealed(t, dir, testKey)
	for _, n := range names {
		tn := &store.Tenant{Name: n, ID: uint64(len(n)*1000 + int(n[0])), Current: 1, CreateTime: time.Now(),
			Versions: []store.KeyVersion{{Version: 1, KDKVersion: 1, State: store.StateEnabled, Salt: []byte(strings.Repeat(n, 32))[:32]}}}
		if err := s.CreateTenant(context.Background(), tn); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Reseal(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	return dir
}

// editOffline changes the file as an attacker with the data directory but
// not the state key would.
func editOffline(t *testing.T, dir string, fn func(tx *bbolt.Tx) error) {
	t.Helper()
	db, err := bbolt.Open(filepath.Join(dir, "hsmd.db"), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func verify(t *testing.T, dir string) error {
	s := openSealed(t, dir, testKey)
	defer s.Close()
	_, err := s.Verify(context.Background())
	return err
}

func TestOfflineEditsAreNamed(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edit  func(tx *bbolt.Tx) error
		words string
	}{
		{"salt changed", func(tx *bbolt.Tx) error {
			b := tx.Bucket([]byte("tenants"))
			v := bytes.Clone(b.Get([]byte("acme")))
			i := bytes.Index(v, []byte(`"salt":"`)) + 8
			v[i] ^= 1 // one base64 character of the salt
			return b.Put([]byte("acme"), v)
		}, `tenant "acme"`},
		{"record removed", func(tx *bbolt.Tx) error {
			return tx.Bucket([]byte("tenants")).Delete([]byte("acme"))
		}, `tenant "acme"`},
		{"record and MAC removed", func(tx *bbolt.Tx) error {
			tx.Bucket([]byte("macs")).Delete([]byte("acme"))
			return tx.Bucket([]byte("tenants")).Delete([]byte("acme"))
		}, `tenant "acme"`},
		{"record, MAC and index removed", func(tx *bbolt.Tx) error {
			tx.Bucket([]byte("macs")).Delete([]byte("acme"))
			c := tx.Bucket([]byte("ids")).Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				if string(v) == "acme" {
					c.Delete()
				}
			}
			return tx.Bucket([]byte("tenants")).Delete([]byte("acme"))
		}, "another copy"},
		{"id index repointed", func(tx *bbolt.Tx) error {
			c := tx.Bucket([]byte("ids")).Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				if string(v) == "acme" {
					return tx.Bucket([]byte("ids")).Put(k, []byte("globex"))
				}
			}
			return nil
		}, "id index"},
		{"record added", func(tx *bbolt.Tx) error {
			return tx.Bucket([]byte("tenants")).Put([]byte("evil"), tx.Bucket([]byte("tenants")).Get([]byte("acme")))
		}, `tenant "evil"`},
		{"state changed", func(tx *bbolt.Tx) error {
			m := tx.Bucket([]byte("meta"))
			return m.Put([]byte("state"), bytes.Replace(m.Get([]byte("state")), []byte(`"counter":1`), []byte(`"counter":9`), 1))
		}, "sealed state"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := sealedWith(t, "acme", "globex")
			if err := verify(t, dir); err != nil {
				t.Fatalf("before the edit: %v", err)
			}
			editOffline(t, dir, tc.edit)
			err := verify(t, dir)
			if !errors.Is(err, store.ErrTampered) || !strings.Contains(err.Error(), tc.words) {
				t.Fatalf("got %v, want ErrTampered naming %s", err, tc.words)
			}
		})
	}
}

// TestRecordRestoredFromOlderCopy: one record (with its MAC) taken from an
// earlier copy of the data directory no longer adds up to the digest.
func TestRecordRestoredFromOlderCopy(t *testing.T) {
	dir := sealedWith(t, "acme", "globex")
	old, err := os.ReadFile(filepath.Join(dir, "hsmd.db"))
	if err != nil {
		t.Fatal(err)
	}
	s := openSealed(t, dir, testKey)
	a, err := s.GetTenant(context.Background(), "acme")
	if err != nil {
		t.Fatal(err)
	}
	a.Versions = append(a.Versions, store.KeyVersion{Version: 2, KDKVersion: 1, State: store.StateEnabled, Salt: bytes.Repeat([]byte{2}, 32)})
	a.Current = 2
	if err := s.UpdateTenant(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	s.Close()
	oldDir := t.TempDir()
	os.WriteFile(filepath.Join(oldDir, "hsmd.db"), old, 0o600)
	var rec, mac []byte
	db, err := bbolt.Open(filepath.Join(oldDir, "hsmd.db"), 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	db.View(func(tx *bbolt.Tx) error {
		rec = bytes.Clone(tx.Bucket([]byte("tenants")).Get([]byte("acme")))
		mac = bytes.Clone(tx.Bucket([]byte("macs")).Get([]byte("acme")))
		return nil
	})
	db.Close()
	editOffline(t, dir, func(tx *bbolt.Tx) error {
		tx.Bucket([]byte("macs")).Put([]byte("acme"), mac)
		return tx.Bucket([]byte("tenants")).Put([]byte("acme"), rec)
	})
	if err := verify(t, dir); !errors.Is(err, store.ErrTampered) || !strings.Contains(err.Error(), "another copy") {
		t.Fatalf("got %v", err)
	}
}

// TestLegacyTenantSalt: a record written before key versions had their own
// salts reads with the tenant's salt as version 1's.
func TestLegacyTenantSalt(t *testing.T) {
	dir := t.TempDir()
	s := openSealed(t, dir, nil)
	s.Close()
	salt := `[` + strings.TrimSuffix(strings.Repeat("7,", 32), ",") + `]`
	rec := `{"revision":1,"tenant":{"name":"old","id":5,"salt":` + salt + `,"current":1,"versions":[{"version":1,"kdk_version":1,"state":"enabled","create_time":"2026-11-23T10:00:00Z"}],"create_time":"2026-11-23T10:00:00Z"}}`
	editOffline(t, dir, func(tx *bbolt.Tx) error {
		tx.Bucket([]byte("ids")).Put([]byte{0, 0, 0, 0, 0, 0, 0, 5}, []byte("old"))
		return tx.Bucket([]byte("tenants")).Put([]byte("old"), []byte(rec))
	})
	got, err := openSealed(t, dir, nil).GetTenant(context.Background(), "old")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Versions[0].Salt, bytes.Repeat([]byte{7}, 32)) || got.Validate() != nil {
		t.Fatalf("legacy record read as %+v", got.Versions[0])
	}
}
