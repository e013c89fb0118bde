package server_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/envelope/wire"
	"github.com/hsmd/hsmd/server"
)

func (s *stack) rotate(tenant string) *hsmdv1.Key {
	s.t.Helper()
	k, err := s.keys.RotateKey(context.Background(), &hsmdv1.RotateKeyRequest{Tenant: tenant})
	if err != nil {
		s.t.Fatal(err)
	}
	return k
}

func versionOf(t *testing.T, ct []byte) uint32 {
	t.Helper()
	h, _, err := wire.Parse(ct)
	if err != nil {
		t.Fatal(err)
	}
	return h.KeyVersion
}

// TestDecryptUnderEveryState: a version's state decides whether its
// ciphertexts open, and the reason says which state refused.
func TestDecryptUnderEveryState(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	ctx := context.Background()
	v1 := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("one")})[0]
	if k := s.rotate("acme"); k.CurrentVersion != 2 {
		t.Fatalf("rotated to %d", k.CurrentVersion)
	}
	v2 := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("two")})[0]
	if versionOf(t, v1) != 1 || versionOf(t, v2) != 2 {
		t.Fatal("new encryptions do not use the newest version")
	}
	open := func(want string) {
		t.Helper()
		r := decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: v1}, &hsmdv1.DecryptItem{Ciphertext: v2})
		wantOK(t, "v2", r[1], "two")
		if want == "" {
			wantOK(t, "v1", r[0], "one")
			return
		}
		if r[0].Error == nil || r[0].Error.Reason != want || codes.Code(r[0].Error.Code) != codes.FailedPrecondition {
			t.Fatalf("v1: %v, want FAILED_PRECONDITION/%s", r[0].Error, want)
		}
	}
	open("")
	req := &hsmdv1.VersionRequest{Tenant: "acme", Version: 1}
	mustKey(t)(s.keys.DisableVersion(ctx, req))
	open(server.ReasonKeyDisabled)
	mustKey(t)(s.keys.EnableVersion(ctx, req))
	open("")
	mustKey(t)(s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "acme", Version: 1, WaitSeconds: 7200}))
	open(server.ReasonKeyDisabled)
	mustKey(t)(s.keys.CancelDestroy(ctx, req))
	open(server.ReasonKeyDisabled) // cancelled destruction leaves it disabled
	mustKey(t)(s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "acme", Version: 1, WaitSeconds: 7200}))
	s.clock.Add(2 * time.Hour)
	if _, err := s.sched.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t)(s.keys.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: "acme"}))
	if k.Versions[0].State != "destroyed" || k.Versions[0].DestroyTime == 0 {
		t.Fatalf("version 1 is %s (destroy time %d) after its destruction time", k.Versions[0].State, k.Versions[0].DestroyTime)
	}
	open(server.ReasonKeyDestroyed)
	// A destroyed version cannot come back.
	if _, err := s.keys.EnableVersion(ctx, req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("enable a destroyed version: %v", err)
	}
}

func mustKey(t *testing.T) func(*hsmdv1.Key, error) *hsmdv1.Key {
	return func(k *hsmdv1.Key, err error) *hsmdv1.Key {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
}

func TestKeyRefusals(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"disable the current version", func() error {
			_, err := s.keys.DisableVersion(ctx, &hsmdv1.VersionRequest{Tenant: "acme", Version: 1})
			return err
		}, codes.FailedPrecondition},
		{"destroy the current version", func() error {
			_, err := s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "acme", Version: 1})
			return err
		}, codes.FailedPrecondition},
		{"unknown version", func() error {
			_, err := s.keys.EnableVersion(ctx, &hsmdv1.VersionRequest{Tenant: "acme", Version: 9})
			return err
		}, codes.NotFound},
		{"unknown tenant", func() error {
			_, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "nobody"})
			return err
		}, codes.NotFound},
		{"enable an enabled version", func() error {
			_, err := s.keys.EnableVersion(ctx, &hsmdv1.VersionRequest{Tenant: "acme", Version: 1})
			return err
		}, codes.FailedPrecondition},
		{"min_decryption_version above current", func() error {
			_, err := s.keys.SetKeyPolicy(ctx, &hsmdv1.SetKeyPolicyRequest{Tenant: "acme", Policy: &hsmdv1.KeyPolicy{MinDecryptionVersion: 5}})
			return err
		}, codes.InvalidArgument},
	} {
		if err := tc.call(); status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.code)
		}
	}
	s.rotate("acme")
	if _, err := s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "acme", Version: 1, WaitSeconds: 60}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a waiting period under the minimum: %v", err)
	}
}

func TestMinDecryptionVersion(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	ctx := context.Background()
	v1 := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("one")})[0]
	s.rotate("acme")
	mustKey(t)(s.keys.SetKeyPolicy(ctx, &hsmdv1.SetKeyPolicyRequest{Tenant: "acme", Policy: &hsmdv1.KeyPolicy{MinDecryptionVersion: 2, RotationPeriodSeconds: 86400}}))
	r := decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: v1})
	if r[0].Error == nil || r[0].Error.Reason != server.ReasonKeyRetired {
		t.Fatalf("v1 under min_decryption_version 2: %v", r[0].Error)
	}
	mustKey(t)(s.keys.SetKeyPolicy(ctx, &hsmdv1.SetKeyPolicyRequest{Tenant: "acme", Policy: &hsmdv1.KeyPolicy{MinDecryptionVersion: 1, RotationPeriodSeconds: 86400}}))
	wantOK(t, "v1 again", decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: v1})[0], "one")
}

// TestAutomaticRotation: with an injected clock, the scheduler rotates a
// tenant once its period has passed (plus its jitter), and only once.
func TestAutomaticRotation(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	ctx := context.Background()
	mustKey(t)(s.keys.SetKeyPolicy(ctx, &hsmdv1.SetKeyPolicyRequest{Tenant: "acme", Policy: &hsmdv1.KeyPolicy{RotationPeriodSeconds: 86400}}))
	if st, err := s.sched.RunOnce(ctx); err != nil || st.Rotated != 0 {
		t.Fatalf("before the period: %+v %v", st, err)
	}
	s.clock.Add(24*time.Hour + 2*time.Hour) // past the period and the default jitter
	if st, err := s.sched.RunOnce(ctx); err != nil || st.Rotated != 1 {
		t.Fatalf("after the period: %+v %v", st, err)
	}
	if st, _ := s.sched.RunOnce(ctx); st.Rotated != 0 {
		t.Fatalf("a second pass rotated again: %+v", st)
	}
	ct := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("x")})[0]
	if versionOf(t, ct) != 2 {
		t.Fatalf("after automatic rotation new encryptions use version %d", versionOf(t, ct))
	}
	if err := s.srv.RefreshKeyMetrics(ctx); err != nil {
		t.Fatal(err)
	}
	if v := metricValue(t, s.reg, "hsmd_key_versions", map[string]string{"state": "enabled"}); v != 2 {
		t.Errorf("hsmd_key_versions{state=enabled} = %v, want 2", v)
	}
	if v := metricValue(t, s.reg, "hsmd_key_next_rotation_seconds", nil); v < 23*3600 || v > 24*3600 {
		t.Errorf("hsmd_key_next_rotation_seconds = %v, want about a day", v)
	}
}

// TestRotationCostsNoHSMCall: rotating many tenants, by RPC and by the
// scheduler, is metadata only.
func TestRotationCostsNoHSMCall(t *testing.T) {
	s := newStack(t, stackOpts{})
	ctx := context.Background()
	for i := range 50 {
		s.createTenant(fmt.Sprintf("t%03d", i))
	}
	before := s.hsmCalls()
	for i := range 25 {
		s.rotate(fmt.Sprintf("t%03d", i))
	}
	s.clock.Add(100 * 24 * time.Hour) // every tenant's 90-day period is over
	st, err := s.sched.RunOnce(ctx)
	if err != nil || st.Rotated != 50 {
		t.Fatalf("scheduler pass: %+v %v", st, err)
	}
	if calls := s.hsmCalls() - before; calls != 0 {
		t.Fatalf("75 rotations cost %v HSM calls", calls)
	}
	if v := metricValue(t, s.reg, "hsmd_key_changes_total", map[string]string{"op": "rotate"}); v != 25 {
		t.Errorf("hsmd_key_changes_total{op=rotate} = %v after 25 RPC rotations", v)
	}
}

// TestRewrapAcrossThreeVersions: one batch of ciphertexts under versions
// 1, 2 and 3 comes back under 3, contexts kept, plaintexts intact.
func TestRewrapAcrossThreeVersions(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	var in []*hsmdv1.DecryptItem
	for v := 1; v <= 3; v++ {
		c := map[string]string{"v": string(rune('0' + v))}
		ct := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte{byte(v)}, Context: c})[0]
		in = append(in, &hsmdv1.DecryptItem{Ciphertext: ct, Context: c})
		if v < 3 {
			s.rotate("acme")
		}
	}
	in = append(in, &hsmdv1.DecryptItem{Ciphertext: []byte("garbage")})
	resp, err := s.env.Rewrap(context.Background(), &hsmdv1.RewrapRequest{Tenant: "acme", Items: in})
	if err != nil {
		t.Fatal(err)
	}
	if resp.KeyVersion != 3 || resp.Results[3].Error == nil || resp.Results[3].Error.Reason != server.ReasonMalformed {
		t.Fatalf("rewrap: version %d, garbage %v", resp.KeyVersion, resp.Results[3].Error)
	}
	for i := range 3 {
		ct := resp.Results[i].Ciphertext
		if versionOf(t, ct) != 3 {
			t.Fatalf("item %d rewrapped to version %d", i, versionOf(t, ct))
		}
		r := decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: ct, Context: in[i].Context})
		if r[0].Error != nil || !bytes.Equal(r[0].Plaintext, []byte{byte(i + 1)}) {
			t.Fatalf("item %d after rewrap: %v", i, r[0].Error)
		}
	}
	if !bytes.Equal(resp.Results[2].Ciphertext, in[2].Ciphertext) {
		t.Fatal("an item already under the current version was re-encrypted")
	}
}

// TestShred: after ShredTenant nothing of the tenant decrypts.
func TestShred(t *testing.T) {
	s := newStack(t, stackOpts{})
	s.createTenant("acme")
	s.createTenant("other")
	ctx := context.Background()
	ct := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: []byte("secret")})[0]
	keep := encrypt(t, s, "other", &hsmdv1.EncryptItem{Plaintext: []byte("kept")})[0]
	if _, err := s.tenants.ShredTenant(ctx, &hsmdv1.ShredTenantRequest{Name: "acme", Confirm: "acm"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("shred without confirmation: %v", err)
	}
	if _, err := s.tenants.ShredTenant(ctx, &hsmdv1.ShredTenantRequest{Name: "acme", Confirm: "acme"}); err != nil {
		t.Fatal(err)
	}
	r := decrypt(t, s, "", &hsmdv1.DecryptItem{Ciphertext: ct}, &hsmdv1.DecryptItem{Ciphertext: keep})
	wantReason(t, "shredded tenant's item", r[0], server.ReasonDecryptFailed)
	wantOK(t, "other tenant", r[1], "kept")
	if _, err := s.tenants.GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: "acme"}); status.Code(err) != codes.NotFound {
		t.Fatalf("get after shred: %v", err)
	}
	// A new tenant of the same name does not open the old data.
	s.createTenant("acme")
	wantReason(t, "same name, new tenant", decrypt(t, s, "acme", &hsmdv1.DecryptItem{Ciphertext: ct})[0], server.ReasonDecryptFailed)
}

// TestUsageLimitRotatesEarly: once the current version has derived
// max_deks_per_version data keys, the tenant rotates.
func TestUsageLimitRotatesEarly(t *testing.T) {
	s := newStack(t, stackOpts{envelope: envelope.Limits{MaxItems: 10}}) // a new data key every 10 items
	s.createTenant("acme")
	ctx := context.Background()
	mustKey(t)(s.keys.SetKeyPolicy(ctx, &hsmdv1.SetKeyPolicyRequest{Tenant: "acme", Policy: &hsmdv1.KeyPolicy{RotationPeriodSeconds: 86400, MaxDeksPerVersion: 16}}))
	items := make([]*hsmdv1.EncryptItem, 10)
	for i := range items {
		items[i] = &hsmdv1.EncryptItem{Plaintext: []byte("x")}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		encrypt(t, s, "acme", items...) // each batch fills one data key
		k := mustKey(t)(s.keys.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: "acme"}))
		if k.CurrentVersion == 2 {
			if k.Versions[0].Deks < 16 {
				t.Fatalf("rotated after %d data keys, the limit is 16", k.Versions[0].Deks)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no rotation; version 1 derived %d data keys", k.Versions[0].Deks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
