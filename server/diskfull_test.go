//go:build linux

package server_test

// Disk full (issue 11): the stack's data directory (bbolt store, audit
// log, socket) on a 2 MiB tmpfs the test mounts. A filler file takes the
// rest of the space; then, while the disk is full:
//
//   - every call either succeeds (it found room) or fails with UNAVAILABLE
//     or RESOURCE_EXHAUSTED and a message that says the disk is full —
//     never INTERNAL, never a hang;
//   - nothing acknowledged is lost: every ciphertext acknowledged before,
//     during and after decrypts, every acknowledged tenant and rotation is
//     in the store;
//   - once the filler is deleted, service comes back without a restart
//     (the recovery time is logged);
//   - afterwards the bbolt file passes bbolt's consistency check and the
//     audit log verifies, with an entry for every acknowledged change.
//
// It runs with the audit log (audit.sync, as a careful deployment does)
// and without it, so that the store's own out-of-space errors are seen
// too. Mounting needs root (or CAP_SYS_ADMIN): without it the test fails
// and says so.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/softhsm"
)

const diskFullSize = 2 << 20

// mountTmpfs mounts a tmpfs of size bytes on a new temp dir and unmounts
// it at cleanup (before the temp dir is removed).
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("the disk-full test needs a size-limited filesystem and could not mount one "+
			"(mount -t tmpfs -o size=%d tmpfs %s: %v); run it as root or with CAP_SYS_ADMIN", size, dir, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			// Something still holds a file there (after a failure: the
			// stack was not stopped): detach it lazily.
			syscall.Unmount(dir, syscall.MNT_DETACH)
			if !t.Failed() {
				t.Errorf("unmounting the test tmpfs %s: %v", dir, err)
			}
		}
	})
	return dir
}

// fill writes a filler file in dir until the filesystem is full and
// returns its path and size.
func fill(t *testing.T, dir string) (string, int64) {
	t.Helper()
	name := filepath.Join(dir, "filler")
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var n int64
	for _, chunk := range []int{64 << 10, 4 << 10, 512} {
		buf := make([]byte, chunk)
		for {
			w, err := f.Write(buf)
			n += int64(w)
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return name, n
}

func TestDiskFull(t *testing.T) {
	t.Run("store+audit", func(t *testing.T) { testDiskFull(t, true) })
	t.Run("store", func(t *testing.T) { testDiskFull(t, false) })
}

// diskRun holds what was acknowledged and how calls ended.
type diskRun struct {
	t  *testing.T
	s  *stack
	ct []ackedItem
	// tenants and rotations acknowledged, by tenant: the versions made.
	tenants  map[string]uint32
	outcomes map[string]int    // "phase method code" -> calls
	messages map[string]string // "method code" -> the first error message
	bad      []string          // unclear errors
}

func testDiskFull(t *testing.T, withAudit bool) {
	ctx := context.Background()
	mnt := mountTmpfs(t, diskFullSize)
	o := stackOpts{audit: withAudit, auditSync: withAudit}
	s := &stack{t: t, tok: softhsm.NewTestToken(t), dir: mnt}
	h := s.openHSM(o)
	if err := h.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	h.Close()
	s.start(o)
	d := &diskRun{t: t, s: s, tenants: map[string]uint32{}, outcomes: map[string]int{}, messages: map[string]string{}}

	for i := range 3 {
		d.round("before", i, true)
	}
	filler, size := fill(t, mnt)
	t.Logf("filler: %d bytes; the filesystem is full", size)
	full := time.Now()
	for i := range 8 {
		d.round("full", i, false)
	}
	// Outlast the audit log's checkpoint interval, so that a checkpoint
	// of the entries written before is signed and archived (or not) on
	// the full disk.
	time.Sleep(300 * time.Millisecond)
	health := d.health()
	t.Logf("health with the disk full: %v (after %v)", health, time.Since(full).Round(time.Millisecond))

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	rec := d.waitWrites(freed)
	serving := d.waitServing()
	t.Logf("space returned: first write acknowledged after %v, health SERVING after %v, no restart",
		rec.Round(time.Millisecond), serving.Sub(freed).Round(time.Millisecond))
	for i := range 3 {
		d.round("after", i, true)
	}
	d.verify()
	s.stop()
	d.checkBolt(filepath.Join(mnt, "hsmd.db"))
	if withAudit {
		d.checkAudit()
	}
	// hsmd starts again on what the full disk left.
	s.start(o)
	d.round("restart", 0, true)
	d.verify()
	s.stop()
	if withAudit {
		d.checkAudit()
	}
	d.report()
}

// round makes one of each call: a tenant, a rotation, an encryption and a
// decryption. must: every call must succeed.
func (d *diskRun) round(phase string, i int, must bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := d.s
	name := fmt.Sprintf("%s-%d", phase, i)
	_, err := s.tenants.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: name})
	if d.outcome(phase, "CreateTenant", err, must) {
		d.tenants[name] = 1
	}
	for tn, v := range d.tenants {
		k, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: tn})
		if d.outcome(phase, "RotateKey", err, must) {
			if k.CurrentVersion != v+1 {
				d.t.Errorf("rotation of %s made version %d after %d", tn, k.CurrentVersion, v)
			}
			d.tenants[tn] = k.CurrentVersion
		}
		break
	}
	for tn := range d.tenants {
		items := make([]*hsmdv1.EncryptItem, 50)
		for j := range items {
			items[j] = &hsmdv1.EncryptItem{Plaintext: bytes.Repeat([]byte{byte(j)}, 1000), Context: map[string]string{"n": name}}
			items[j].Plaintext = fmt.Appendf(items[j].Plaintext, "%s-%d", name, j)
		}
		resp, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: tn, Items: items})
		if d.outcome(phase, "Encrypt", err, must) {
			for j, it := range items {
				d.ct = append(d.ct, ackedItem{pt: it.Plaintext, ct: resp.Ciphertexts[j], ctx: it.Context})
			}
		}
		break
	}
	if len(d.ct) > 0 {
		a := d.ct[len(d.ct)/2]
		resp, err := s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Items: []*hsmdv1.DecryptItem{{Ciphertext: a.ct, Context: a.ctx}}})
		if d.outcome(phase, "Decrypt", err, must) {
			if r := resp.Results[0]; r.Error != nil || !bytes.Equal(r.Plaintext, a.pt) {
				d.t.Errorf("%s: decrypt of an acknowledged item: %v", phase, r.Error)
			}
		}
	}
}

// outcome records how a call ended and reports whether it succeeded.
// A failure must be UNAVAILABLE or RESOURCE_EXHAUSTED naming the disk.
func (d *diskRun) outcome(phase, method string, err error, must bool) bool {
	st := status.Convert(err)
	d.outcomes[fmt.Sprintf("%-6s %-12s %v", phase, method, st.Code())]++
	if err == nil {
		return true
	}
	msg := st.Message()
	if _, ok := d.messages[method+" "+st.Code().String()]; !ok {
		d.messages[method+" "+st.Code().String()] = msg
	}
	clear := (st.Code() == codes.Unavailable || st.Code() == codes.ResourceExhausted) &&
		(strings.Contains(msg, "disk") || strings.Contains(msg, "space"))
	if must || !clear {
		d.bad = append(d.bad, fmt.Sprintf("%s %s: %v: %s", phase, method, st.Code(), msg))
	}
	return false
}

func (d *diskRun) health() healthpb.HealthCheckResponse_ServingStatus {
	r, err := healthpb.NewHealthClient(d.s.conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		return healthpb.HealthCheckResponse_UNKNOWN
	}
	return r.Status
}

// waitWrites waits (10s at most) until a new tenant can be created and
// returns how long it took from freed.
func (d *diskRun) waitWrites(freed time.Time) time.Duration {
	for i := 0; ; i++ {
		name := fmt.Sprintf("recover-%d", i)
		_, err := d.s.tenants.CreateTenant(context.Background(), &hsmdv1.CreateTenantRequest{Name: name})
		if err == nil {
			d.tenants[name] = 1
			return time.Since(freed)
		}
		if time.Since(freed) > 10*time.Second {
			d.t.Fatalf("no write succeeds 10s after space returned: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (d *diskRun) waitServing() time.Time {
	deadline := time.Now().Add(10 * time.Second)
	for d.health() != healthpb.HealthCheckResponse_SERVING {
		if time.Now().After(deadline) {
			d.t.Fatal("health is not SERVING 10s after space returned")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Now()
}

// verify checks that everything acknowledged is there.
func (d *diskRun) verify() {
	t, s := d.t, d.s
	ctx := context.Background()
	items := make([]*hsmdv1.DecryptItem, len(d.ct))
	for i, a := range d.ct {
		items[i] = &hsmdv1.DecryptItem{Ciphertext: a.ct, Context: a.ctx}
	}
	resp, err := s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Items: items})
	if err != nil {
		t.Fatalf("decrypting the acknowledged items: %v", err)
	}
	lost := 0
	for i, r := range resp.Results {
		if r.Error != nil || !bytes.Equal(r.Plaintext, d.ct[i].pt) {
			lost++
		}
	}
	for tn, v := range d.tenants {
		k, err := s.keys.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: tn})
		if err != nil || k.CurrentVersion != v {
			lost++
			t.Errorf("acknowledged tenant %s at version %d: %v %v", tn, v, k.GetCurrentVersion(), err)
		}
	}
	if lost != 0 {
		t.Errorf("%d acknowledged writes lost", lost)
	}
	t.Logf("acknowledged and present: %d ciphertexts, %d tenants; lost: %d", len(d.ct), len(d.tenants), lost)
}

// checkBolt runs bbolt's own consistency check on the store file.
func (d *diskRun) checkBolt(path string) {
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		d.t.Fatalf("reopening the store: %v", err)
	}
	defer db.Close()
	err = db.View(func(tx *bbolt.Tx) error {
		var errs []error
		for e := range tx.Check() {
			errs = append(errs, e)
		}
		return errors.Join(errs...)
	})
	if err != nil {
		d.t.Errorf("the store fails bbolt's check: %v", err)
	}
}

// checkAudit verifies the audit log and finds a successful response entry
// for every acknowledged change.
func (d *diskRun) checkAudit() {
	t, s := d.t, d.s
	ctx := context.Background()
	rep, err := audit.Verify(ctx, s.auditDir(), parseVerifiers(t, s.vkeys))
	if err != nil {
		t.Errorf("the audit log does not verify: %v", err)
		return
	}
	ok := map[string]int{}
	for _, e := range s.auditEntries() {
		if e.Kind == audit.KindResponse && e.Code == "OK" {
			ok[e.Method]++
		}
	}
	want := 0
	for _, v := range d.tenants {
		want += int(v) // one CreateTenant and v-1 rotations
	}
	if got := ok["CreateTenant"] + ok["RotateKey"]; got < want {
		t.Errorf("the audit log records %d successful changes, %d were acknowledged", got, want)
	}
	t.Logf("audit log verified: %d entries, %d checkpoints", rep.Size, rep.Checkpoints)
}

func (d *diskRun) report() {
	keys := make([]string, 0, len(d.outcomes))
	for k := range d.outcomes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	b.WriteString("calls by phase, method and code:\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "  %s  %d\n", k, d.outcomes[k])
	}
	for k, m := range d.messages {
		fmt.Fprintf(&b, "  %s: %q\n", k, m)
	}
	d.t.Log(b.String())
	for _, m := range d.bad {
		d.t.Errorf("unclear or unexpected failure: %s", m)
	}
}
