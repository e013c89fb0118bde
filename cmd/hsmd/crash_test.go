package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/server"
)

// crashRig drives the real daemon (dev profile) through gRPC.
type crashRig struct {
	t   *testing.T
	dir string
	env hsmdv1.EnvelopeClient
	ten hsmdv1.TenantsClient
	key hsmdv1.KeysClient
	cc  *grpc.ClientConn
}

func newCrashRig(t *testing.T) *crashRig {
	r := &crashRig{t: t, dir: t.TempDir()}
	cc, err := grpc.NewClient("unix://"+filepath.Join(r.dir, "var", "hsmd.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true))) // across the daemon's restarts
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	r.cc, r.env, r.ten, r.key = cc, hsmdv1.NewEnvelopeClient(cc), hsmdv1.NewTenantsClient(cc), hsmdv1.NewKeysClient(cc)
	return r
}

// start runs the daemon, with a failpoint armed if fp is set.
func (r *crashRig) start(fp string) *daemonProc {
	cmd := serveCmd(r.t, r.dir)
	cmd.Env = append(os.Environ(), "HSMD_FAILPOINT="+fp)
	return startDaemon(r.t, cmd)
}

func (r *crashRig) encrypt(tenant string, pt string) []byte {
	r.t.Helper()
	resp, err := r.env.Encrypt(context.Background(), &hsmdv1.EncryptRequest{Tenant: tenant, Items: []*hsmdv1.EncryptItem{{Plaintext: []byte(pt)}}})
	if err != nil {
		r.t.Fatal(err)
	}
	return resp.Ciphertexts[0]
}

// crashed waits for a daemon that hit its failpoint to be gone.
func crashed(t *testing.T, d *daemonProc) {
	t.Helper()
	d.once.Do(func() {}) // it is not to be stopped gracefully
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the daemon did not crash at its failpoint\n%s", d.out)
	}
}

// TestCrashAtEveryFailpoint kills the daemon with SIGKILL at each step of
// rotate, destroy and shred, restarts it, and checks the invariants: the
// daemon starts (the store verifies, the rollback counter agrees); versions
// are 1..n with none lost or doubled; every ciphertext returned before the
// crash decrypts unless its version was explicitly destroyed; a shred is
// done or not, never half.
func TestCrashAtEveryFailpoint(t *testing.T) {
	for _, fp := range []string{"rotate/before-commit", "rotate/after-commit", "destroy/after-commit", "shred/before-delete", "shred/after-delete"} {
		t.Run(fp, func(t *testing.T) {
			r := newCrashRig(t)
			ctx := context.Background()
			d := r.start("")
			for _, n := range []string{"acme", "victim"} {
				if _, err := r.ten.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: n}); err != nil {
					t.Fatal(err)
				}
			}
			acks := map[string][]byte{"acme/1": r.encrypt("acme", "a1"), "victim/1": r.encrypt("victim", "v1")}
			if _, err := r.key.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "acme"}); err != nil {
				t.Fatal(err)
			}
			acks["acme/2"] = r.encrypt("acme", "a2")
			if fp == "destroy/after-commit" {
				if _, err := r.key.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "acme", Version: 1, WaitSeconds: 1}); err != nil {
					t.Fatal(err)
				}
			}
			d.stop(t)

			d = r.start(fp)
			// The call that crashes the daemon must not wait for (and be
			// replayed on) the restarted one.
			once, cancel := context.WithTimeout(ctx, 20*time.Second)
			switch fp {
			case "shred/before-delete", "shred/after-delete":
				r.ten.ShredTenant(once, &hsmdv1.ShredTenantRequest{Name: "victim", Confirm: "victim"}, grpc.WaitForReady(false))
			default:
				time.Sleep(1100 * time.Millisecond) // past a scheduled destruction
				r.key.RotateKey(once, &hsmdv1.RotateKeyRequest{Tenant: "acme"}, grpc.WaitForReady(false))
			}
			cancel()
			crashed(t, d)

			d = r.start("")
			defer d.stop(t)
			r.checkInvariants(fp, acks)
		})
	}
}

func (r *crashRig) checkInvariants(fp string, acks map[string][]byte) {
	t, ctx := r.t, context.Background()
	k, err := r.key.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range k.Versions {
		if v.Version != uint32(i+1) {
			t.Fatalf("versions after the crash: %v", k.Versions)
		}
	}
	if k.CurrentVersion != uint32(len(k.Versions)) || len(k.Versions) < 2 || len(k.Versions) > 3 {
		t.Fatalf("current %d of %d versions", k.CurrentVersion, len(k.Versions))
	}
	destroyed := k.Versions[0].State == "destroyed"
	for name, ct := range acks {
		tenant, pt := name[:len(name)-2], string(name[0])+name[len(name)-1:]
		res, err := r.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Items: []*hsmdv1.DecryptItem{{Ciphertext: ct}}})
		if err != nil {
			t.Fatal(err)
		}
		got := res.Results[0]
		switch {
		case name == "acme/1" && destroyed:
			if got.Error.GetReason() != server.ReasonKeyDestroyed {
				t.Errorf("%s under a destroyed version: %v", name, got.Error)
			}
		case name == "acme/1" && fp == "destroy/after-commit":
			if got.Error.GetReason() != server.ReasonKeyDisabled {
				t.Errorf("%s under a version scheduled for destruction: %v", name, got.Error)
			}
		case tenant == "victim":
			r.checkShred(got, pt)
		case got.Error != nil || !bytes.Equal(got.Plaintext, []byte(pt)):
			t.Errorf("%s after the crash: %v", name, got.Error)
		}
	}
	if fp == "destroy/after-commit" && !destroyed {
		t.Errorf("the destruction committed before the failpoint is not there: %v", k.Versions[0].State)
	}
	// Each failpoint stops at its step: what was committed before it is
	// there, what was to come after it is not.
	wantVersions := map[string]int{"rotate/before-commit": 2, "rotate/after-commit": 3, "destroy/after-commit": 2, "shred/before-delete": 2, "shred/after-delete": 2}[fp]
	if len(k.Versions) != wantVersions {
		t.Errorf("%d versions after a crash at %s, want %d", len(k.Versions), fp, wantVersions)
	}
	_, err = r.ten.GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: "victim"})
	if gone := status.Code(err) == codes.NotFound; gone != (fp == "shred/after-delete") {
		t.Errorf("after a crash at %s the victim is gone: %v", fp, gone)
	}
}

// checkShred: the victim is either whole (its data decrypts) or gone (its
// data does not, and the tenant is unknown), never half.
func (r *crashRig) checkShred(got *hsmdv1.DecryptResult, pt string) {
	_, err := r.ten.GetTenant(context.Background(), &hsmdv1.GetTenantRequest{Name: "victim"})
	switch {
	case err == nil:
		if got.Error != nil || string(got.Plaintext) != pt {
			r.t.Errorf("the victim exists but its data does not decrypt: %v", got.Error)
		}
	case status.Code(err) == codes.NotFound:
		if got.Error.GetReason() != server.ReasonDecryptFailed {
			r.t.Errorf("the victim is gone but its data says %v", got.Error)
		}
	default:
		r.t.Fatal(err)
	}
}
