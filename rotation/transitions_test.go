package rotation

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/hsmd/hsmd/store"
)

// Versions of the fixture, by state.
const (
	vEnabled   = 1 // enabled, not current
	vDisabled  = 2
	vScheduled = 3
	vDestroyed = 4
	vCurrent   = 5
	vMissing   = 9
)

// fixture returns a valid tenant with a version in each state.
func fixture() *store.Tenant {
	t := newTenant("acme", 42, t0, 24*time.Hour)
	kv := func(v uint32, s store.KeyState) store.KeyVersion {
		k := store.KeyVersion{Version: v, KDKVersion: 1, State: s, Salt: salt(uint64(v)), CreateTime: t0}
		switch s {
		case store.StateDestroyScheduled:
			k.DestroyTime = t0.Add(48 * time.Hour)
		case store.StateDestroyed:
			k.Salt, k.DestroyTime = nil, t0.Add(-time.Hour)
		}
		return k
	}
	t.Versions = []store.KeyVersion{
		kv(vEnabled, store.StateEnabled),
		kv(vDisabled, store.StateDisabled),
		kv(vScheduled, store.StateDestroyScheduled),
		kv(vDestroyed, store.StateDestroyed),
		kv(vCurrent, store.StateEnabled),
	}
	t.Current = vCurrent
	return t
}

func TestFixtureValid(t *testing.T) {
	if err := fixture().Validate(); err != nil {
		t.Fatal(err)
	}
}

// op is a version transition under test.
type op struct {
	name string
	fn   func(*store.Tenant, uint32) error
}

var ops = []op{
	{"Disable", Disable},
	{"Enable", Enable},
	{"ScheduleDestroy", func(t *store.Tenant, v uint32) error {
		return ScheduleDestroy(t, v, t0, DefaultDestroyWait, MinDestroyWait)
	}},
	{"ScheduleDestroyShortWait", func(t *store.Tenant, v uint32) error {
		return ScheduleDestroy(t, v, t0, MinDestroyWait-time.Second, MinDestroyWait)
	}},
	{"CancelDestroy", CancelDestroy},
}

func TestTransitions(t *testing.T) {
	ok := error(nil)
	// want[op][version]: nil, or the sentinel of the refusal.
	want := map[string]map[uint32]error{
		"Disable": {vEnabled: ok, vDisabled: ErrTransition, vScheduled: ErrTransition,
			vDestroyed: ErrTransition, vCurrent: ErrCurrent, vMissing: ErrNoVersion},
		"Enable": {vEnabled: ErrTransition, vDisabled: ok, vScheduled: ErrTransition,
			vDestroyed: ErrTransition, vCurrent: ErrTransition, vMissing: ErrNoVersion},
		"ScheduleDestroy": {vEnabled: ok, vDisabled: ok, vScheduled: ErrTransition,
			vDestroyed: ErrTransition, vCurrent: ErrCurrent, vMissing: ErrNoVersion},
		"ScheduleDestroyShortWait": {vEnabled: ErrWaitTooShort, vDisabled: ErrWaitTooShort,
			vScheduled: ErrWaitTooShort, vDestroyed: ErrWaitTooShort, vCurrent: ErrWaitTooShort, vMissing: ErrWaitTooShort},
		"CancelDestroy": {vEnabled: ErrTransition, vDisabled: ErrTransition, vScheduled: ok,
			vDestroyed: ErrTransition, vCurrent: ErrTransition, vMissing: ErrNoVersion},
	}
	// after[op]: the state of the version after an allowed transition.
	after := map[string]store.KeyState{
		"Disable": store.StateDisabled, "Enable": store.StateEnabled,
		"ScheduleDestroy": store.StateDestroyScheduled, "CancelDestroy": store.StateDisabled,
	}
	for _, o := range ops {
		for _, v := range []uint32{vEnabled, vDisabled, vScheduled, vDestroyed, vCurrent, vMissing} {
			tn := fixture()
			name := o.name + "/" + stateName(tn, v)
			t.Run(name, func(t *testing.T) {
				before := clone(tn)
				err := o.fn(tn, v)
				w := want[o.name][v]
				if w == nil {
					checkAllowed(t, before, tn, v, after[o.name], err)
					return
				}
				if !errors.Is(err, w) {
					t.Fatalf("error %v, want %v", err, w)
				}
				if !reflect.DeepEqual(before, tn) {
					t.Fatalf("a refused %s changed the tenant", o.name)
				}
			})
		}
	}
}

func stateName(t *store.Tenant, v uint32) string {
	if v == t.Current {
		return "current"
	}
	if kv, ok := t.Version(v); ok {
		return string(kv.State)
	}
	return "missing"
}

// checkAllowed checks an allowed transition of version v to state to: only
// that version changed, the record is valid, DestroyTime is right.
func checkAllowed(t *testing.T, before, got *store.Tenant, v uint32, to store.KeyState, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("refused: %v", err)
	}
	if err := got.Validate(); err != nil {
		t.Fatalf("invalid after the transition: %v", err)
	}
	kv, _ := got.Version(v)
	if kv.State != to {
		t.Fatalf("state %s, want %s", kv.State, to)
	}
	switch {
	case to == store.StateDestroyScheduled && !kv.DestroyTime.Equal(t0.Add(DefaultDestroyWait)):
		t.Fatalf("DestroyTime %v, want now+wait", kv.DestroyTime)
	case to != store.StateDestroyScheduled && !kv.DestroyTime.IsZero():
		t.Fatalf("DestroyTime %v, want zero", kv.DestroyTime)
	}
	for i := range got.Versions {
		if got.Versions[i].Version != v && !reflect.DeepEqual(got.Versions[i], before.Versions[i]) {
			t.Fatalf("version %d changed too", got.Versions[i].Version)
		}
	}
}

func TestTransitionMessages(t *testing.T) {
	err := Enable(fixture(), vScheduled)
	if !strings.Contains(err.Error(), "destroy_scheduled → enabled") {
		t.Fatalf("message %q does not name from → to", err)
	}
}

func TestScheduleDestroyWait(t *testing.T) {
	tn := fixture()
	if err := ScheduleDestroy(tn, vEnabled, t0, 0, 0); err != nil {
		t.Fatalf("zero wait with no minimum (--dev): %v", err)
	}
	tn = fixture()
	if err := ScheduleDestroy(tn, vEnabled, t0, -time.Second, 0); !errors.Is(err, ErrWaitTooShort) {
		t.Fatalf("negative wait: %v", err)
	}
	if err := ScheduleDestroy(tn, vEnabled, t0, MinDestroyWait, MinDestroyWait); err != nil {
		t.Fatalf("wait == minimum: %v", err)
	}
}

func TestRotate(t *testing.T) {
	tn := fixture()
	r := bytes.NewReader(bytes.Repeat([]byte{7}, store.SaltSize))
	v, err := Rotate(tn, 3, t0.Add(time.Hour), r)
	if err != nil {
		t.Fatal(err)
	}
	if v != vCurrent+1 || tn.Current != v {
		t.Fatalf("new version %d, current %d; want %d", v, tn.Current, vCurrent+1)
	}
	kv, _ := tn.Version(v)
	want := store.KeyVersion{Version: v, KDKVersion: 3, State: store.StateEnabled,
		Salt: bytes.Repeat([]byte{7}, store.SaltSize), CreateTime: t0.Add(time.Hour)}
	if !reflect.DeepEqual(kv, want) {
		t.Fatalf("new version %+v, want %+v", kv, want)
	}
	if prev, _ := tn.Version(vCurrent); prev.State != store.StateEnabled {
		t.Fatalf("previous current is %s, want enabled", prev.State)
	}
	if err := tn.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestRotateNumbersAboveDestroyed(t *testing.T) {
	tn := fixture()
	tn.Versions[len(tn.Versions)-1].Version = 7 // current 7 above a gap
	tn.Current = 7
	if v, err := Rotate(tn, 1, t0, bytes.NewReader(salt(1))); err != nil || v != 8 {
		t.Fatalf("Rotate = %d, %v; want 8", v, err)
	}
}

func TestRotateRefused(t *testing.T) {
	exhausted := fixture()
	exhausted.Versions[len(exhausted.Versions)-1].Version = ^uint32(0)
	exhausted.Current = ^uint32(0)
	for _, tc := range []struct {
		name string
		t    *store.Tenant
		kdk  uint32
		rand io.Reader
		want error
	}{
		{"kdk0", fixture(), 0, bytes.NewReader(salt(1)), nil},
		{"short", fixture(), 1, bytes.NewReader(make([]byte, 5)), io.ErrUnexpectedEOF},
		{"failing", fixture(), 1, iotest.ErrReader(io.ErrClosedPipe), io.ErrClosedPipe},
		{"zeros", fixture(), 1, bytes.NewReader(make([]byte, store.SaltSize)), nil},
		{"exhausted", exhausted, 1, bytes.NewReader(salt(1)), ErrTransition},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := clone(tc.t)
			_, err := Rotate(tc.t, tc.kdk, t0, tc.rand)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if !reflect.DeepEqual(before, tc.t) {
				t.Fatal("a refused Rotate changed the tenant")
			}
		})
	}
}

func TestSetPolicy(t *testing.T) {
	for _, tc := range []struct {
		p     store.Policy
		field string // "" if allowed
	}{
		{store.Policy{}, ""},
		{store.Policy{RotationPeriod: MinRotationPeriod, MinDecryptionVersion: vCurrent}, ""},
		{store.Policy{RotationPeriod: DefaultRotationPeriod, MinDecryptionVersion: 1}, ""},
		{store.Policy{RotationPeriod: MinRotationPeriod - 1}, "rotation_period"},
		{store.Policy{RotationPeriod: -time.Hour}, "rotation_period"},
		{store.Policy{MinDecryptionVersion: vCurrent + 1}, "min_decryption_version"},
	} {
		tn := fixture()
		before := clone(tn)
		err := SetPolicy(tn, tc.p)
		switch {
		case tc.field == "" && (err != nil || tn.Policy != tc.p):
			t.Errorf("SetPolicy(%+v) = %v, policy %+v", tc.p, err, tn.Policy)
		case tc.field != "" && (!errors.Is(err, ErrPolicy) || !strings.Contains(err.Error(), tc.field)):
			t.Errorf("SetPolicy(%+v) = %v, want ErrPolicy naming %s", tc.p, err, tc.field)
		case tc.field != "" && !reflect.DeepEqual(before, tn):
			t.Errorf("a refused SetPolicy(%+v) changed the tenant", tc.p)
		}
	}
}

func TestCanDecrypt(t *testing.T) {
	ok := error(nil)
	for _, tc := range []struct {
		min  uint32
		want map[uint32]error
	}{
		{0, map[uint32]error{vEnabled: ok, vDisabled: ErrDisabled, vScheduled: ErrDisabled,
			vDestroyed: ErrDestroyed, vCurrent: ok, vMissing: ErrNoVersion}},
		{1, map[uint32]error{vEnabled: ok, vDisabled: ErrDisabled, vScheduled: ErrDisabled,
			vDestroyed: ErrDestroyed, vCurrent: ok, vMissing: ErrNoVersion}},
		{vScheduled, map[uint32]error{vEnabled: ErrBelowMinVersion, vDisabled: ErrBelowMinVersion,
			vScheduled: ErrDisabled, vDestroyed: ErrDestroyed, vCurrent: ok, vMissing: ErrNoVersion}},
		{vCurrent, map[uint32]error{vEnabled: ErrBelowMinVersion, vDisabled: ErrBelowMinVersion,
			vScheduled: ErrBelowMinVersion, vDestroyed: ErrDestroyed, vCurrent: ok, vMissing: ErrNoVersion}},
	} {
		tn := fixture()
		tn.Policy.MinDecryptionVersion = tc.min
		for v, want := range tc.want {
			err := CanDecrypt(tn, v)
			if (want == nil) != (err == nil) || !errors.Is(err, want) {
				t.Errorf("min %d, version %d (%s): %v, want %v", tc.min, v, stateName(tn, v), err, want)
			}
		}
	}
}

func TestDestroyDue(t *testing.T) {
	tn := fixture()
	if err := ScheduleDestroy(tn, vEnabled, t0, 96*time.Hour, 0); err != nil {
		t.Fatal(err)
	}
	dueSalt, _ := tn.Version(vScheduled) // due at t0+48h
	laterSalt, _ := tn.Version(vEnabled) // due at t0+96h
	keep := bytes.Clone(laterSalt.Salt)
	if got := DestroyDue(tn, t0.Add(48*time.Hour-1)); got != nil {
		t.Fatalf("destroyed %v before the time", got)
	}
	got := DestroyDue(tn, t0.Add(48*time.Hour))
	if !reflect.DeepEqual(got, []uint32{vScheduled}) {
		t.Fatalf("destroyed %v, want [%d]", got, vScheduled)
	}
	kv, _ := tn.Version(vScheduled)
	if kv.State != store.StateDestroyed || kv.Salt != nil || !kv.DestroyTime.Equal(t0.Add(48*time.Hour)) {
		t.Fatalf("destroyed version %+v", kv)
	}
	if !allZero(dueSalt.Salt) {
		t.Fatal("the destroyed salt's memory was not zeroed")
	}
	if kv, _ := tn.Version(vEnabled); kv.State != store.StateDestroyScheduled || !bytes.Equal(kv.Salt, keep) {
		t.Fatalf("a version not yet due was touched: %+v", kv)
	}
	if kv, _ := tn.Version(vDisabled); kv.Salt == nil {
		t.Fatal("a disabled version lost its salt")
	}
	if err := tn.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := DestroyDue(tn, t0.Add(48*time.Hour)); got != nil {
		t.Fatalf("destroyed %v twice", got)
	}
}

func TestDue(t *testing.T) {
	tn := newTenant("a", 1, t0, 24*time.Hour)
	if next, ok := NextRotation(tn); !ok || !next.Equal(t0.Add(24*time.Hour)) {
		t.Fatalf("NextRotation = %v, %v", next, ok)
	}
	if Due(tn, t0.Add(24*time.Hour-1)) || !Due(tn, t0.Add(24*time.Hour)) {
		t.Fatal("Due wrong around the period")
	}
	tn.Policy.RotationPeriod = 0
	if _, ok := NextRotation(tn); ok || Due(tn, t0.Add(1000*24*time.Hour)) {
		t.Fatal("a tenant with period 0 is due")
	}
}
