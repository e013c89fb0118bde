package client

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// testKey is the fake's answer to every Keys call.
func testKey() *hsmdv1.Key {
	return &hsmdv1.Key{
		Tenant:         "t1",
		CurrentVersion: 3,
		Versions: []*hsmdv1.KeyVersion{
			{Version: 1, KdkVersion: 1, State: StateDestroyed, CreateTime: 1700000000, DestroyTime: 1700600000},
			{Version: 2, KdkVersion: 1, State: StateDestroyScheduled, CreateTime: 1700100000, DestroyTime: 1800000000},
			{Version: 3, KdkVersion: 2, State: StateEnabled, CreateTime: 1700200000},
		},
		Policy:           &hsmdv1.KeyPolicy{RotationPeriodSeconds: 720 * 3600, MinDecryptionVersion: 2},
		NextRotationTime: 1702792000,
	}
}

func TestKeysRequests(t *testing.T) {
	f, c := dialFake(t)
	f.key = testKey()
	tests := []struct {
		name string
		call func(context.Context) (Key, error)
		want proto.Message
	}{
		{"RotateKey", func(ctx context.Context) (Key, error) { return c.RotateKey(ctx, "t1") },
			&hsmdv1.RotateKeyRequest{Tenant: "t1"}},
		{"GetKey", func(ctx context.Context) (Key, error) { return c.GetKey(ctx, "t1") },
			&hsmdv1.GetKeyRequest{Tenant: "t1"}},
		{"SetKeyPolicy", func(ctx context.Context) (Key, error) {
			return c.SetKeyPolicy(ctx, "t1", Policy{RotationPeriod: 90 * time.Minute, MinDecryptionVersion: 2})
		}, &hsmdv1.SetKeyPolicyRequest{Tenant: "t1", Policy: &hsmdv1.KeyPolicy{RotationPeriodSeconds: 5400, MinDecryptionVersion: 2}}},
		{"SetKeyPolicy zero", func(ctx context.Context) (Key, error) { return c.SetKeyPolicy(ctx, "t1", Policy{}) },
			&hsmdv1.SetKeyPolicyRequest{Tenant: "t1", Policy: &hsmdv1.KeyPolicy{}}},
		{"DisableVersion", func(ctx context.Context) (Key, error) { return c.DisableVersion(ctx, "t1", 2) },
			&hsmdv1.VersionRequest{Tenant: "t1", Version: 2}},
		{"EnableVersion", func(ctx context.Context) (Key, error) { return c.EnableVersion(ctx, "t1", 5) },
			&hsmdv1.VersionRequest{Tenant: "t1", Version: 5}},
		{"ScheduleDestroy", func(ctx context.Context) (Key, error) { return c.ScheduleDestroy(ctx, "t1", 2, 168*time.Hour) },
			&hsmdv1.ScheduleDestroyRequest{Tenant: "t1", Version: 2, WaitSeconds: 168 * 3600}},
		{"ScheduleDestroy default", func(ctx context.Context) (Key, error) { return c.ScheduleDestroy(ctx, "t1", 2, 0) },
			&hsmdv1.ScheduleDestroyRequest{Tenant: "t1", Version: 2}},
		{"CancelDestroy", func(ctx context.Context) (Key, error) { return c.CancelDestroy(ctx, "t1", 7) },
			&hsmdv1.VersionRequest{Tenant: "t1", Version: 7}},
	}
	for _, tt := range tests {
		k, err := tt.call(t.Context())
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if got := f.lastRequest(); !proto.Equal(got, tt.want) {
			t.Errorf("%s sent %v, want %v", tt.name, got, tt.want)
		}
		if k.Tenant != "t1" || k.CurrentVersion != 3 || len(k.Versions) != 3 {
			t.Errorf("%s = %+v", tt.name, k)
		}
	}
}

func TestKeyFromProto(t *testing.T) {
	k, err := keyFromProto(testKey())
	if err != nil {
		t.Fatal(err)
	}
	if k.Policy != (Policy{RotationPeriod: 720 * time.Hour, MinDecryptionVersion: 2}) {
		t.Errorf("Policy = %+v", k.Policy)
	}
	if k.NextRotation.Unix() != 1702792000 || k.NextRotation.Location() != time.UTC {
		t.Errorf("NextRotation = %v", k.NextRotation)
	}
	want := []KeyVersion{
		{1, 1, StateDestroyed, time.Unix(1700000000, 0).UTC(), time.Unix(1700600000, 0).UTC()},
		{2, 1, StateDestroyScheduled, time.Unix(1700100000, 0).UTC(), time.Unix(1800000000, 0).UTC()},
		{3, 2, StateEnabled, time.Unix(1700200000, 0).UTC(), time.Time{}},
	}
	for i, v := range k.Versions {
		if v != want[i] {
			t.Errorf("version %d = %+v, want %+v", i, v, want[i])
		}
	}

	k, err = keyFromProto(&hsmdv1.Key{Tenant: "t1", CurrentVersion: 1})
	if err != nil || !k.NextRotation.IsZero() || k.Policy != (Policy{}) {
		t.Errorf("key without policy or next rotation = %+v, %v", k, err)
	}
	for _, secs := range []int64{-1, 1 << 62} {
		_, err := keyFromProto(&hsmdv1.Key{Policy: &hsmdv1.KeyPolicy{RotationPeriodSeconds: secs}})
		if err == nil || !strings.HasPrefix(err.Error(), "hsmd client: ") {
			t.Errorf("rotation period of %d s: %v, want a client error", secs, err)
		}
	}
}

func TestKeysBadDurations(t *testing.T) {
	f, c := dialFake(t)
	f.key = testKey()
	for _, d := range []time.Duration{-time.Hour, 1500 * time.Millisecond} {
		if _, err := c.SetKeyPolicy(t.Context(), "t1", Policy{RotationPeriod: d}); err == nil || !strings.HasPrefix(err.Error(), "hsmd client: ") {
			t.Errorf("SetKeyPolicy(%v): %v, want a client error", d, err)
		}
		if _, err := c.ScheduleDestroy(t.Context(), "t1", 2, d); err == nil || !strings.HasPrefix(err.Error(), "hsmd client: ") {
			t.Errorf("ScheduleDestroy(%v): %v, want a client error", d, err)
		}
	}
	if got := f.lastRequest(); got != nil {
		t.Errorf("a bad duration reached the server: %v", got)
	}
}

func TestKeysNotFound(t *testing.T) {
	_, c := dialFake(t)
	if _, err := c.GetKey(t.Context(), "missing"); status.Code(err) != codes.NotFound {
		t.Errorf("GetKey(missing): %v, want NotFound", err)
	}
	if _, err := c.DisableVersion(t.Context(), "missing", 1); status.Code(err) != codes.NotFound {
		t.Errorf("DisableVersion(missing): %v, want NotFound", err)
	}
}

// checkKeyStateErrs checks the three key-state item errors, in order.
func checkKeyStateErrs(t *testing.T, errs []error) {
	t.Helper()
	sentinels := []error{ErrKeyDisabled, ErrKeyDestroyed, ErrKeyRetired}
	for i, err := range errs {
		var ie *ItemError
		if !errors.As(err, &ie) || ie.Code != codes.FailedPrecondition {
			t.Errorf("item %d: %#v, want an *ItemError with FailedPrecondition", i, err)
			continue
		}
		for j, s := range append(sentinels, ErrDecrypt, ErrMalformed) {
			if want := i == j; errors.Is(err, s) != want {
				t.Errorf("item %d (%s): errors.Is(err, %v) = %v, want %v", i, ie.Reason, s, !want, want)
			}
		}
	}
}

func TestDecryptKeyStates(t *testing.T) {
	_, c := dialFake(t)
	var items []CiphertextItem
	for _, ct := range []string{"disabled", "destroyed", "retired"} {
		items = append(items, CiphertextItem{Ciphertext: []byte(ct)})
	}
	rs, err := c.Decrypt(t.Context(), "t1", items)
	if err != nil {
		t.Fatal(err)
	}
	var errs []error
	for _, r := range rs {
		errs = append(errs, r.Err)
	}
	checkKeyStateErrs(t, errs)
	if _, err := c.DecryptOne(t.Context(), "t1", items[0]); !errors.Is(err, ErrKeyDisabled) {
		t.Errorf("DecryptOne(disabled): %v, want ErrKeyDisabled", err)
	}
}

func TestRewrap(t *testing.T) {
	f, c := dialFake(t)
	aad := map[string]string{"table": "users"}
	items := []CiphertextItem{
		{Ciphertext: []byte("ct:t1:a"), Context: aad},
		{Ciphertext: []byte("disabled")},
		{Ciphertext: []byte("destroyed")},
		{Ciphertext: []byte("retired")},
		{Ciphertext: []byte("tampered")},
		{Ciphertext: []byte(ToText([]byte("ct:t1:b")))},
		{Ciphertext: []byte("garbage")},
		{Ciphertext: []byte("ct:t2:c")}, // another tenant's
	}
	rs, ver, err := c.Rewrap(t.Context(), "t1", items)
	if err != nil {
		t.Fatal(err)
	}
	want := &hsmdv1.RewrapRequest{Tenant: "t1"}
	for _, it := range items {
		want.Items = append(want.Items, &hsmdv1.DecryptItem{Ciphertext: it.Ciphertext, Context: it.Context})
	}
	if got := f.lastRequest(); !proto.Equal(got, want) {
		t.Errorf("Rewrap sent %v, want %v", got, want)
	}
	if ver != 4 || len(rs) != len(items) {
		t.Fatalf("Rewrap = %d results, version %d", len(rs), ver)
	}
	if rs[0].Err != nil || string(rs[0].Ciphertext) != "ct:t1:a" {
		t.Errorf("item 0 = %q, %v", rs[0].Ciphertext, rs[0].Err)
	}
	checkKeyStateErrs(t, []error{rs[1].Err, rs[2].Err, rs[3].Err})
	if rs[4].Err != ErrDecrypt || rs[4].Ciphertext != nil {
		t.Errorf("tampered item: %v, want exactly ErrDecrypt", rs[4].Err)
	}
	if rs[5].Err != nil || string(rs[5].Ciphertext) != "ct:t1:b" {
		t.Errorf("text-form item = %q, %v", rs[5].Ciphertext, rs[5].Err)
	}
	if !errors.Is(rs[6].Err, ErrMalformed) {
		t.Errorf("malformed item: %v, want ErrMalformed", rs[6].Err)
	}
	if rs[7].Err != ErrDecrypt {
		t.Errorf("other tenant's item: %v, want ErrDecrypt", rs[7].Err)
	}
}

func TestRewrapBrokenServer(t *testing.T) {
	_, c := dialFake(t)
	for _, tenant := range []string{"short", "empty"} {
		rs, _, err := c.Rewrap(t.Context(), tenant, []CiphertextItem{{Ciphertext: []byte("ct:" + tenant + ":x")}})
		if err == nil || status.Code(err) != codes.Unknown || !strings.HasPrefix(err.Error(), "hsmd client: ") || rs != nil {
			t.Errorf("Rewrap from a broken server (%s) = %v, %v; want a client error", tenant, rs, err)
		}
	}
}

func TestShredTenant(t *testing.T) {
	f, c := dialFake(t)
	if _, err := c.CreateTenant(t.Context(), "gone"); err != nil {
		t.Fatal(err)
	}
	if err := c.ShredTenant(t.Context(), "gone"); err != nil {
		t.Fatal(err)
	}
	want := &hsmdv1.ShredTenantRequest{Name: "gone", Confirm: "gone"}
	if got := f.lastRequest(); !proto.Equal(got, want) {
		t.Errorf("ShredTenant sent %v, want %v", got, want)
	}
	if _, err := c.GetTenant(t.Context(), "gone"); status.Code(err) != codes.NotFound {
		t.Errorf("GetTenant after shredding: %v, want NotFound", err)
	}
	if err := c.ShredTenant(t.Context(), "gone"); status.Code(err) != codes.NotFound {
		t.Errorf("ShredTenant twice: %v, want NotFound", err)
	}
}
