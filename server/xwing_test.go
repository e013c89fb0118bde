package server_test

import (
	"bytes"
	"context"
	"crypto/hpke"
	"crypto/sha3"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
)

func (s *stack) client() *client.Client {
	s.t.Helper()
	c, err := client.Dial(context.Background(), "unix://"+filepath.Join(s.dir, "hsmd.sock"))
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { c.Close() })
	return c
}

func publicKey(t *testing.T, c *client.Client, tenant string) *client.PublicKey {
	t.Helper()
	pk, err := c.PublicKey(context.Background(), tenant)
	if err != nil {
		t.Fatal(err)
	}
	return pk
}

func seal(t *testing.T, pk *client.PublicKey, pt string, ctx map[string]string) []byte {
	t.Helper()
	ct, err := pk.Seal([]byte(pt), ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// TestXWingOfflineSealOpens: a record the client seals offline to the
// tenant's public key opens through hsmd, and not under another tenant,
// key version or context; it follows its version's states.
func TestXWingOfflineSealOpens(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	s.createTenant("globex")
	c := s.client()
	ctx := context.Background()
	pk := publicKey(t, c, "acme")
	if pk.Version != 1 || len(pk.Key) != 1216 {
		t.Fatalf("public key of version %d, %d bytes", pk.Version, len(pk.Key))
	}
	if again := publicKey(t, c, "acme"); !bytes.Equal(again.Key, pk.Key) {
		t.Fatal("a second GetPublicKey made another key pair")
	}
	row := map[string]string{"table": "users", "row": "42"}
	ct := seal(t, pk, "offline secret", row)
	wantOK(t, "named tenant", decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: ct, Context: row})[0], "offline secret")
	wantOK(t, "no tenant named", decrypt(t, s, "", &hsmdv1.DecryptItem{Ciphertext: ct, Context: row})[0], "offline secret")

	gpk := publicKey(t, c, "globex") // globex's version 1 has a pair too
	v2 := s.rotate("acme")
	pk2 := publicKey(t, c, "acme")
	if pk2.Version != v2.CurrentVersion || bytes.Equal(pk2.Key, pk.Key) {
		t.Fatalf("after rotation: version %d, same key %v", pk2.Version, bytes.Equal(pk2.Key, pk.Key))
	}
	withVersion := bytes.Clone(ct)
	binary.BigEndian.PutUint32(withVersion[10:14], pk2.Version)
	withTenant := bytes.Clone(ct)
	binary.BigEndian.PutUint64(withTenant[2:10], gpk.TenantID)
	otherTenantsKey := seal(t, gpk, "offline secret", row)
	binary.BigEndian.PutUint64(otherTenantsKey[2:10], pk.TenantID) // globex's record claiming to be acme's
	r := decrypt(t, s, "",
		&hsmdv1.DecryptItem{Ciphertext: ct, Context: row},
		&hsmdv1.DecryptItem{Ciphertext: ct, Context: map[string]string{"table": "users", "row": "43"}},
		&hsmdv1.DecryptItem{Ciphertext: ct},
		&hsmdv1.DecryptItem{Ciphertext: withVersion, Context: row},
		&hsmdv1.DecryptItem{Ciphertext: withTenant, Context: row},
		&hsmdv1.DecryptItem{Ciphertext: otherTenantsKey, Context: row},
		&hsmdv1.DecryptItem{Ciphertext: seal(t, pk2, "v2", nil)},
	)
	wantOK(t, "old version after rotation", r[0], "offline secret")
	wantReason(t, "other context", r[1], server.ReasonDecryptFailed)
	wantReason(t, "no context", r[2], server.ReasonDecryptFailed)
	wantReason(t, "other key version", r[3], server.ReasonDecryptFailed)
	wantReason(t, "other tenant id", r[4], server.ReasonDecryptFailed)
	wantReason(t, "other tenant's key", r[5], server.ReasonDecryptFailed)
	wantOK(t, "new version", r[6], "v2")
	wantReason(t, "request names another tenant", decrypt(t, s, "globex", &hsmdv1.DecryptItem{Ciphertext: ct, Context: row})[0], server.ReasonDecryptFailed)

	// States: disabled and destroyed versions refuse; destruction erases
	// the sealed private key with the salt.
	req := &hsmdv1.VersionRequest{Tenant: "acme", Version: 1}
	mustKey(t)(s.keys.DisableVersion(ctx, req))
	wantState(t, decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: ct, Context: row})[0], server.ReasonKeyDisabled)
	mustKey(t)(s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "acme", Version: 1, WaitSeconds: 7200}))
	s.clock.Add(2 * time.Hour)
	if _, err := s.sched.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	wantState(t, decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: ct, Context: row})[0], server.ReasonKeyDestroyed)
	s.stop()
	tn := readTenant(t, s, "acme")
	if kv, _ := tn.Version(1); kv.XWingSealed != nil || kv.Salt != nil {
		t.Fatal("the destroyed version keeps its sealed X-Wing private key or its salt")
	}
	if kv, _ := tn.Version(2); kv.XWingSealed == nil {
		t.Fatal("version 2 lost its X-Wing key")
	}
}

func wantState(t *testing.T, r *hsmdv1.DecryptResult, reason string) {
	t.Helper()
	if r.Error == nil || r.Error.Reason != reason {
		t.Fatalf("got %v, want %s", r.Error, reason)
	}
}

// readTenant reads a tenant from the stopped stack's store.
func readTenant(t *testing.T, s *stack, name string) *store.Tenant {
	t.Helper()
	st, err := bolt.Open(filepath.Join(s.dir, "hsmd.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	tn, err := st.GetTenant(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return tn
}

// xwingSeed opens, on the stopped stack's token, the X-Wing private key of
// a tenant version, with the AAD of docs/FORMAT.md built here.
func xwingSeed(t *testing.T, s *stack, name string, v uint32) []byte {
	t.Helper()
	tn := readTenant(t, s, name)
	kv, ok := tn.Version(v)
	if !ok {
		t.Fatalf("no version %d", v)
	}
	aad := append([]byte("hsmd/xwing-key/v1\x00"), binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, tn.ID), v)...)
	h := s.openHSM(stackOpts{})
	defer h.Close()
	if err := h.LoadKeys(context.Background()); err != nil {
		t.Fatal(err)
	}
	seed, err := h.WrapOpen(context.Background(), kv.XWingSealed, aad)
	if err != nil {
		t.Fatal(err)
	}
	return seed
}

// hpkeInfo and hpkeAAD follow docs/FORMAT.md, suite 0x02, without the
// wire package.
func hpkeInfo(tenant string, id uint64, v uint32) []byte {
	info := append([]byte("hsmd/v1/xwing-hpke/hkdf-sha256/aes-256-gcm"), 0)
	info = binary.BigEndian.AppendUint64(info, id)
	info = binary.BigEndian.AppendUint32(info, v)
	info = append(info, byte(len(tenant)))
	return append(info, tenant...)
}

func hpkeAAD(prefix []byte, tenant string, ctx map[string]string) []byte {
	aad := append(bytes.Clone(prefix[:14]), byte(len(tenant)))
	aad = append(aad, tenant...)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(ctx)))
	keys := make([]string, 0, len(ctx))
	for k := range ctx {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(k)))
		aad = append(aad, k...)
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(ctx[k])))
		aad = append(aad, ctx[k]...)
	}
	return aad
}

// TestXWingInteropWithCryptoHPKE: a record sealed with crypto/hpke by hand
// opens in hsmd, and one sealed by the client opens with crypto/hpke given
// the private key.
func TestXWingInteropWithCryptoHPKE(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	c := s.client()
	pk := publicKey(t, c, "acme")
	row := map[string]string{"row": "7", "col": "ssn"}

	kem := hpke.MLKEM768X25519()
	pub, err := kem.NewPublicKey(pk.Key)
	if err != nil {
		t.Fatal(err)
	}
	prefix := []byte{0x01, 0x02}
	prefix = binary.BigEndian.AppendUint64(prefix, pk.TenantID)
	prefix = binary.BigEndian.AppendUint32(prefix, pk.Version)
	enc, sender, err := hpke.NewSender(pub, hpke.HKDFSHA256(), hpke.AES256GCM(), hpkeInfo("acme", pk.TenantID, pk.Version))
	if err != nil {
		t.Fatal(err)
	}
	body, err := sender.Seal(hpkeAAD(prefix, "acme", row), []byte("by hand"))
	if err != nil {
		t.Fatal(err)
	}
	byHand := append(append(prefix, enc...), body...)
	wantOK(t, "sealed with crypto/hpke", decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: byHand, Context: row})[0], "by hand")

	ct := seal(t, pk, "by the client", row)
	s.stop()
	priv, err := kem.NewPrivateKey(xwingSeed(t, s, "acme", pk.Version))
	if err != nil {
		t.Fatal(err)
	}
	r, err := hpke.NewRecipient(ct[14:14+1120], priv, hpke.HKDFSHA256(), hpke.AES256GCM(), hpkeInfo("acme", pk.TenantID, pk.Version))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := r.Open(hpkeAAD(ct, "acme", row), ct[14+1120:])
	if err != nil || string(pt) != "by the client" {
		t.Fatalf("crypto/hpke open: %q %v", pt, err)
	}
}

// TestXWingPrivateKeyNotAtRest: neither the X-Wing private key (its seed)
// nor its expansion (ML-KEM seed, X25519 scalar) is anywhere in the data
// directory, raw, hex or base64, while the public key is (the scan works).
func TestXWingPrivateKeyNotAtRest(t *testing.T) {
	s := newStack(t, stackOpts{audit: true})
	s.createTenant("acme")
	c := s.client()
	pk := publicKey(t, c, "acme")
	ct := seal(t, pk, "x", nil)
	wantOK(t, "open", decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: ct})[0], "x")
	s.stop()
	seed := xwingSeed(t, s, "acme", pk.Version)
	expanded := sha3.SumSHAKE256(seed, 96) // X-Wing: ML-KEM d||z, then the X25519 scalar
	secrets := map[string][]byte{"seed": seed, "ml-kem seed": expanded[:64], "x25519 scalar": expanded[64:]}
	var files [][]byte
	err := filepath.WalkDir(s.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Type()&fs.ModeSocket != 0 {
			return err
		}
		b, err := os.ReadFile(path)
		files = append(files, b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if !anyHas(files, encodings(pk.Key[:48])) {
		t.Fatal("the scan does not find the public key: it would not find the private key either")
	}
	for name, sec := range secrets {
		if anyHas(files, encodings(sec)) {
			t.Errorf("the X-Wing %s is in the data directory", name)
		}
	}
}

// encodings are the forms a secret could be stored in; base64 of a 48-byte
// prefix (a multiple of 3) and of shifted copies so a secret inside a
// larger base64 blob is found too.
func encodings(b []byte) [][]byte {
	out := [][]byte{b, []byte(hex.EncodeToString(b))}
	for shift := range 3 {
		pad := append(make([]byte, shift), b...)
		n := (len(pad) / 3) * 3
		for _, e := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			s := e.EncodeToString(pad[:n])
			out = append(out, []byte(s[(shift*4+2)/3+1:len(s)-1]))
		}
	}
	return out
}

func anyHas(files [][]byte, needles [][]byte) bool {
	for _, f := range files {
		for _, n := range needles {
			if bytes.Contains(f, n) {
				return true
			}
		}
	}
	return false
}
