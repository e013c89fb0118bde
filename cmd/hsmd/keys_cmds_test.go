package main

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// keysFake adds to cliFake a Keys service over in-memory keys, shredding,
// and the key-state item errors of Decrypt (for the inputs "disabled",
// "destroyed" and "retired").
type keysFake struct {
	*cliFake
	hsmdv1.UnimplementedKeysServer

	mu         sync.Mutex
	keys       map[string]*hsmdv1.Key
	lastPolicy *hsmdv1.SetKeyPolicyRequest
	lastShred  *hsmdv1.ShredTenantRequest
}

// fakeNow is the fake's clock, in Unix seconds: 2023-11-14T22:13:20Z.
const fakeNow = 1700000000

func (f *keysFake) Decrypt(ctx context.Context, req *hsmdv1.DecryptRequest) (*hsmdv1.DecryptResponse, error) {
	reasons := map[string]string{"disabled": "KEY_DISABLED", "destroyed": "KEY_DESTROYED", "retired": "KEY_VERSION_RETIRED"}
	if r, ok := reasons[string(req.GetItems()[0].GetCiphertext())]; ok {
		return &hsmdv1.DecryptResponse{Results: []*hsmdv1.DecryptResult{{Error: &hsmdv1.ItemError{
			Code: int32(codes.FailedPrecondition), Reason: r, Message: "server detail the CLI need not print"}}}}, nil
	}
	return f.cliFake.Decrypt(ctx, req)
}

func (f *keysFake) ShredTenant(_ context.Context, req *hsmdv1.ShredTenantRequest) (*hsmdv1.ShredTenantResponse, error) {
	f.mu.Lock()
	f.lastShred = proto.Clone(req).(*hsmdv1.ShredTenantRequest)
	f.mu.Unlock()
	f.cliFake.mu.Lock()
	defer f.cliFake.mu.Unlock()
	if req.GetConfirm() != req.GetName() {
		return nil, status.Error(codes.InvalidArgument, "confirm must repeat the name")
	}
	if _, ok := f.tenants[req.GetName()]; !ok {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", req.GetName())
	}
	delete(f.tenants, req.GetName())
	return &hsmdv1.ShredTenantResponse{}, nil
}

// update applies op to a clone of the tenant's key under the lock, and
// keeps the result if op succeeds.
func (f *keysFake) update(tenant string, op func(k *hsmdv1.Key) error) (*hsmdv1.Key, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, ok := f.keys[tenant]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", tenant)
	}
	k = proto.Clone(k).(*hsmdv1.Key)
	if err := op(k); err != nil {
		return nil, err
	}
	f.keys[tenant] = k
	return k, nil
}

// version returns version v of k, refusing the current one if notCurrent.
func version(k *hsmdv1.Key, v uint32, notCurrent bool) (*hsmdv1.KeyVersion, error) {
	if notCurrent && v == k.CurrentVersion {
		return nil, status.Error(codes.FailedPrecondition, "the current version cannot change state")
	}
	for _, kv := range k.Versions {
		if kv.Version == v {
			return kv, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "no version %d", v)
}

func (f *keysFake) GetKey(_ context.Context, req *hsmdv1.GetKeyRequest) (*hsmdv1.Key, error) {
	return f.update(req.Tenant, func(*hsmdv1.Key) error { return nil })
}

func (f *keysFake) RotateKey(_ context.Context, req *hsmdv1.RotateKeyRequest) (*hsmdv1.Key, error) {
	return f.update(req.Tenant, func(k *hsmdv1.Key) error {
		k.CurrentVersion++
		k.Versions = append(k.Versions, &hsmdv1.KeyVersion{Version: k.CurrentVersion, KdkVersion: 2, State: "enabled", CreateTime: fakeNow + 3600})
		return nil
	})
}

func (f *keysFake) SetKeyPolicy(_ context.Context, req *hsmdv1.SetKeyPolicyRequest) (*hsmdv1.Key, error) {
	f.mu.Lock()
	f.lastPolicy = proto.Clone(req).(*hsmdv1.SetKeyPolicyRequest)
	f.mu.Unlock()
	return f.update(req.Tenant, func(k *hsmdv1.Key) error {
		k.Policy = req.Policy
		k.NextRotationTime = 0
		if p := req.Policy.GetRotationPeriodSeconds(); p > 0 {
			k.NextRotationTime = fakeNow + p
		}
		return nil
	})
}

func (f *keysFake) setState(tenant string, v uint32, state string, destroy int64) (*hsmdv1.Key, error) {
	return f.update(tenant, func(k *hsmdv1.Key) error {
		kv, err := version(k, v, true)
		if err != nil {
			return err
		}
		kv.State, kv.DestroyTime = state, destroy
		return nil
	})
}

func (f *keysFake) DisableVersion(_ context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return f.setState(req.Tenant, req.Version, "disabled", 0)
}

func (f *keysFake) EnableVersion(_ context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return f.setState(req.Tenant, req.Version, "enabled", 0)
}

func (f *keysFake) ScheduleDestroy(_ context.Context, req *hsmdv1.ScheduleDestroyRequest) (*hsmdv1.Key, error) {
	wait := req.WaitSeconds
	if wait == 0 {
		wait = 7 * 24 * 3600
	}
	return f.setState(req.Tenant, req.Version, "destroy_scheduled", fakeNow+wait)
}

func (f *keysFake) CancelDestroy(_ context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return f.setState(req.Tenant, req.Version, "disabled", 0)
}

// startKeysFake serves a keysFake with the tenant "payments" (key version
// 1, no policy) on a unix socket and returns it with its address.
func startKeysFake(t *testing.T) (*keysFake, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	f := &keysFake{cliFake: &cliFake{tenants: map[string]*hsmdv1.Tenant{}}, keys: map[string]*hsmdv1.Key{
		"payments": {Tenant: "payments", CurrentVersion: 1, Policy: &hsmdv1.KeyPolicy{},
			Versions: []*hsmdv1.KeyVersion{{Version: 1, KdkVersion: 1, State: "enabled", CreateTime: fakeNow}}},
	}}
	srv := grpc.NewServer()
	hsmdv1.RegisterEnvelopeServer(srv, f)
	hsmdv1.RegisterTenantsServer(srv, f)
	hsmdv1.RegisterKeysServer(srv, f)
	go srv.Serve(lis) //nolint:errcheck // returns at Stop
	t.Cleanup(srv.Stop)
	return f, "unix://" + sock
}

func TestKeysShow(t *testing.T) {
	_, addr := startKeysFake(t)
	r := runCLI(t, addr, nil, "keys", "show", "payments")
	want := `tenant:                  payments
current version:         1
rotation period:         never
min decryption version:  0
max DEKs per version:    0
next rotation:           -
versions:
  1  kdk 1  enabled  2023-11-14T22:13:20Z  -
`
	if r.code != 0 || r.stdout != want || r.stderr != "" {
		t.Errorf("keys show = %+v, want stdout\n%s", r, want)
	}
	r = runCLI(t, addr, nil, "keys", "show", "nobody")
	if r.code != 1 || r.stderr != "hsmd: error: get key: tenant \"nobody\" not found (NotFound)\n" {
		t.Errorf("keys show unknown = %+v", r)
	}
}

// TestKeysLifeCycle runs each subcommand in turn and checks the key it
// prints.
func TestKeysLifeCycle(t *testing.T) {
	f, addr := startKeysFake(t)
	steps := []struct {
		args []string
		want []string // substrings of stdout
	}{
		{[]string{"rotate", "payments"}, []string{"current version:         2\n", "  2  kdk 2  enabled  2023-11-14T23:13:20Z  -\n"}},
		{[]string{"policy", "payments", "--rotation-period", "720h"},
			[]string{"rotation period:         720h\n", "min decryption version:  0\n", "next rotation:           2023-12-14T22:13:20Z\n"}},
		// Only the flag given changes: the rotation period stays.
		{[]string{"policy", "payments", "--min-decryption-version=2"}, []string{"rotation period:         720h\n", "min decryption version:  2\n"}},
		{[]string{"disable", "payments", "1"}, []string{"  1  kdk 1  disabled  2023-11-14T22:13:20Z  -\n"}},
		{[]string{"enable", "payments", "1"}, []string{"  1  kdk 1  enabled  2023-11-14T22:13:20Z  -\n"}},
		{[]string{"destroy", "payments", "1", "--wait", "48h"},
			[]string{"  1  kdk 1  destroy_scheduled  2023-11-14T22:13:20Z  2023-11-16T22:13:20Z\n"}},
		{[]string{"cancel-destroy", "payments", "1"}, []string{"  1  kdk 1  disabled  2023-11-14T22:13:20Z  -\n"}},
		{[]string{"destroy", "payments", "1"}, []string{"destroy_scheduled  2023-11-14T22:13:20Z  2023-11-21T22:13:20Z\n"}},
	}
	for _, s := range steps {
		r := runCLI(t, addr, nil, append([]string{"keys"}, s.args...)...)
		if r.code != 0 || r.stderr != "" || !strings.HasPrefix(r.stdout, "tenant:                  payments\n") {
			t.Errorf("keys %q = %+v", s.args, r)
			continue
		}
		for _, w := range s.want {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("keys %q printed\n%s\nwithout %q", s.args, r.stdout, w)
			}
		}
	}
	want := &hsmdv1.SetKeyPolicyRequest{Tenant: "payments",
		Policy: &hsmdv1.KeyPolicy{RotationPeriodSeconds: 720 * 3600, MinDecryptionVersion: 2}}
	f.mu.Lock()
	if !proto.Equal(f.lastPolicy, want) {
		t.Errorf("last SetKeyPolicy = %v, want %v", f.lastPolicy, want)
	}
	f.mu.Unlock()

	r := runCLI(t, addr, nil, "keys", "disable", "payments", "2")
	if r.code != 1 || r.stdout != "" || !strings.Contains(r.stderr, "disable key version: ") || !strings.Contains(r.stderr, "(FailedPrecondition)") {
		t.Errorf("keys disable of the current version = %+v", r)
	}
}

func TestKeysUsage(t *testing.T) {
	_, addr := startKeysFake(t)
	for _, args := range [][]string{
		{"keys"},
		{"keys", "frobnicate", "payments"},
		{"keys", "show"},
		{"keys", "show", "payments", "1"},
		{"keys", "rotate", "payments", "--wait", "1h"},
		{"keys", "disable", "payments"},
		{"keys", "disable", "payments", "0"},
		{"keys", "disable", "payments", "x"},
		{"keys", "enable", "payments", "4294967296"},
		{"keys", "cancel-destroy", "payments", "1", "2"},
		{"keys", "policy", "payments"},
		{"keys", "policy", "payments", "--rotation-period", "-1h"},
		{"keys", "policy", "payments", "--rotation-period", "1500ms"},
		{"keys", "policy", "payments", "--rotation-period", "soon"},
		{"keys", "policy", "payments", "--min-decryption-version", "4294967296"},
		{"keys", "destroy", "payments", "1", "--wait", "-1s"},
		{"keys", "show", "payments", "--addr", "ftp://x"},
	} {
		if r := runCLI(t, addr, nil, args...); r.code != 2 || !strings.HasPrefix(r.stderr, "hsmd: error: ") || r.stdout != "" {
			t.Errorf("%q = %+v, want exit 2", args, r)
		}
	}
	if r := runCLI(t, addr, nil, "keys", "help"); r.code != 0 || !strings.Contains(r.stdout, "cancel-destroy T V") {
		t.Errorf("keys help = %+v", r)
	}
	if r := runCLI(t, addr, nil, "keys", "destroy", "-h"); r.code != 0 || !strings.Contains(r.stderr, "-wait") {
		t.Errorf("keys destroy -h = %+v", r)
	}
	if r := runCLI(t, addr, nil, "help"); !strings.Contains(r.stdout, "  keys ") {
		t.Errorf("hsmd help does not list keys: %q", r.stdout)
	}
}

func TestTenantsShred(t *testing.T) {
	f, addr := startKeysFake(t)
	runCLI(t, addr, nil, "tenants", "create", "doomed")
	for _, args := range [][]string{
		{"tenants", "shred", "doomed"},
		{"tenants", "shred", "doomed", "--confirm", "other"},
		{"tenants", "shred", "doomed", "--confirm="},
		{"tenants", "shred", "--confirm", "doomed"},
	} {
		r := runCLI(t, addr, nil, args...)
		if r.code != 2 || !strings.HasPrefix(r.stderr, "hsmd: error: ") || r.stdout != "" {
			t.Errorf("%q = %+v, want exit 2", args, r)
		}
	}
	f.mu.Lock()
	if f.lastShred != nil {
		t.Errorf("a refused shred reached the server: %v", f.lastShred)
	}
	f.mu.Unlock()
	r := runCLI(t, addr, nil, "tenants", "shred", "doomed", "--confirm")
	if r.code != 2 || !strings.Contains(r.stderr, "--confirm must repeat the tenant name") &&
		!strings.Contains(r.stderr, "flag needs an argument") {
		t.Errorf("shred --confirm without a value = %+v", r)
	}

	r = runCLI(t, addr, nil, "tenants", "shred", "doomed", "--confirm", "doomed")
	if r.code != 0 || r.stdout != "hsmd: shredded tenant doomed: its data can no longer be decrypted\n" || r.stderr != "" {
		t.Errorf("tenants shred = %+v", r)
	}
	want := &hsmdv1.ShredTenantRequest{Name: "doomed", Confirm: "doomed"}
	f.mu.Lock()
	if !proto.Equal(f.lastShred, want) {
		t.Errorf("ShredTenant sent %v, want %v", f.lastShred, want)
	}
	f.mu.Unlock()
	if r := runCLI(t, addr, nil, "tenants", "get", "doomed"); r.code != 1 || !strings.Contains(r.stderr, "NotFound") {
		t.Errorf("tenants get after shred = %+v", r)
	}
	r = runCLI(t, addr, nil, "tenants", "shred", "doomed", "--confirm", "doomed")
	if r.code != 1 || r.stderr != "hsmd: error: shred tenant: tenant \"doomed\" not found (NotFound)\n" {
		t.Errorf("tenants shred twice = %+v", r)
	}
}

func TestDecryptKeyStates(t *testing.T) {
	_, addr := startKeysFake(t)
	tests := []struct{ in, err, hint string }{
		{"disabled", "the key version is disabled", "`hsmd keys show payments` shows its state"},
		{"destroyed", "the key version is destroyed", "nothing it encrypted can be decrypted again"},
		{"retired", "the key version is retired: it is below the tenant's minimum decryption version",
			"`hsmd keys policy payments --min-decryption-version N`"},
	}
	for _, tt := range tests {
		r := runCLI(t, addr, strings.NewReader(tt.in), "decrypt", "--tenant", "payments")
		if r.code != 1 || r.stdout != "" || !strings.HasPrefix(r.stderr, "hsmd: error: "+tt.err+"\nhsmd: hint: ") ||
			!strings.Contains(r.stderr, tt.hint) || strings.Contains(r.stderr, "server detail") {
			t.Errorf("decrypt of a %s item = %+v", tt.in, r)
		}
	}
	r := runCLI(t, addr, strings.NewReader("disabled"), "decrypt")
	if !strings.Contains(r.stderr, "`hsmd keys show TENANT`") {
		t.Errorf("decrypt without --tenant: hint %q, want a TENANT placeholder", r.stderr)
	}
}

func TestFormatPeriod(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                            "never",
		time.Hour:                    "1h",
		720 * time.Hour:              "720h",
		90 * time.Minute:             "1h30m",
		time.Hour + 30*time.Second:   "1h0m30s",
		2*time.Hour + 5*time.Minute:  "2h5m",
		45 * time.Minute:             "45m",
		45*time.Minute + time.Second: "45m1s",
	} {
		if got := formatPeriod(d); got != want {
			t.Errorf("formatPeriod(%v) = %q, want %q", d, got, want)
		}
	}
}
