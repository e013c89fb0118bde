package rotation

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hsmd/hsmd/store"
)

// TestRecordDEK: data keys are counted per version, and the tenant rotates
// in the write that reaches its limit, once; counts of an older version
// never rotate.
func TestRecordDEK(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	now := time.Unix(1_800_000_000, 0)
	createTenants(t, s, "u", 1, 1, now, 24*time.Hour)
	var changes []Change
	m := &Manager{Store: s, Now: func() time.Time { return now },
		OnChange: func(_ context.Context, c Change) error { changes = append(changes, c); return nil }}
	tn, err := s.GetTenant(ctx, "u-000000")
	if err != nil {
		t.Fatal(err)
	}
	tn.Policy.MaxDEKsPerVersion = 3 // below the minimum SetPolicy allows: written directly
	if err := s.UpdateTenant(ctx, tn); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{false, false, true, false} {
		rotated, err := m.RecordDEK(ctx, "u-000000", 1, 1)
		if err != nil || rotated != want {
			t.Fatalf("data key %d of version 1: rotated %v (%v), want %v", i+1, rotated, err, want)
		}
	}
	got, _ := s.GetTenant(ctx, "u-000000")
	if got.Current != 2 || got.Versions[0].DEKs != 4 || len(changes) != 1 || changes[0].Op != OpUsage {
		t.Fatalf("after 4 data keys: current %d, version 1 counted %d, changes %+v", got.Current, got.Versions[0].DEKs, changes)
	}
	if _, err := m.RecordDEK(ctx, "u-000000", 9, 1); err == nil {
		t.Fatal("an unknown version was counted")
	}
}

func TestUsageLimitFloor(t *testing.T) {
	tn := newTenant("floor", 1, time.Unix(1_800_000_000, 0), 24*time.Hour)
	if err := SetPolicy(tn, store.Policy{MaxDEKsPerVersion: MinMaxDEKsPerVersion - 1}); !errors.Is(err, ErrPolicy) {
		t.Fatalf("a usage limit below the floor: %v", err)
	}
	if err := SetPolicy(tn, store.Policy{MaxDEKsPerVersion: MinMaxDEKsPerVersion}); err != nil {
		t.Fatal(err)
	}
}
