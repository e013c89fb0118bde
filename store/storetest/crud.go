package storetest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/hsmd/hsmd/store"
)

func testCreateGetRoundTrip(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	want := newTenant(t, "acme.prod-1")
	in := *want
	in.Versions = slices.Clone(want.Versions)
	in.Revision = 12345 // ignored by CreateTenant
	if err := s.CreateTenant(ctx, &in); err != nil {
		t.Fatalf("CreateTenant: %v", err)
	}
	if in.Revision == 0 || in.Revision == 12345 {
		t.Fatalf("CreateTenant set Revision = %d, want a fresh non-zero revision", in.Revision)
	}
	want.Revision = in.Revision
	if in.CreateTime != want.CreateTime || in.Versions[1].CreateTime != want.Versions[1].CreateTime {
		t.Errorf("CreateTenant changed the times of its argument")
	}
	got := mustGet(t, s, want.Name)
	if d := diff(want, got); d != "" {
		t.Errorf("GetTenant: %s", d)
	}
	got, err := s.GetTenantByID(ctx, want.ID)
	if err != nil {
		t.Fatalf("GetTenantByID: %v", err)
	}
	if d := diff(want, got); d != "" {
		t.Errorf("GetTenantByID: %s", d)
	}
}

func testDuplicateName(t *testing.T, f Factory) {
	s, _ := open(t, f)
	first := newTenant(t, "dup")
	mustCreate(t, s, first)
	second := newTenant(t, "dup")
	if err := s.CreateTenant(context.Background(), second); !errors.Is(err, store.ErrExists) {
		t.Fatalf("CreateTenant of a taken name: err = %v, want ErrExists", err)
	}
	if d := diff(first, mustGet(t, s, "dup")); d != "" {
		t.Errorf("after duplicate create: %s", d)
	}
	if _, err := s.GetTenantByID(context.Background(), second.ID); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetTenantByID of the rejected tenant: err = %v, want ErrNotFound", err)
	}
}

func testDuplicateID(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	first := newTenant(t, "first")
	mustCreate(t, s, first)
	second := newTenant(t, "second")
	second.ID = first.ID
	if err := s.CreateTenant(ctx, second); !errors.Is(err, store.ErrExists) {
		t.Fatalf("CreateTenant with a taken ID: err = %v, want ErrExists", err)
	}
	if _, err := s.GetTenant(ctx, "second"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetTenant of the rejected tenant: err = %v, want ErrNotFound", err)
	}
	got, err := s.GetTenantByID(ctx, first.ID)
	if err != nil {
		t.Fatalf("GetTenantByID: %v", err)
	}
	if d := diff(first, got); d != "" {
		t.Errorf("GetTenantByID after duplicate ID: %s", d)
	}
}

func testInvalid(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	cases := map[string]func(*store.Tenant){
		"empty name":           func(tn *store.Tenant) { tn.Name = "" },
		"bad name":             func(tn *store.Tenant) { tn.Name = "-leading-dash" },
		"name with slash":      func(tn *store.Tenant) { tn.Name = "a/b" },
		"long name":            func(tn *store.Tenant) { tn.Name = strings.Repeat("a", 65) },
		"zero ID":              func(tn *store.Tenant) { tn.ID = 0 },
		"zero salt":            func(tn *store.Tenant) { tn.Versions[0].Salt = make([]byte, store.SaltSize) },
		"short salt":           func(tn *store.Tenant) { tn.Versions[0].Salt = tn.Versions[0].Salt[:8] },
		"unknown state":        func(tn *store.Tenant) { tn.Versions[0].State = "lost" },
		"current disabled":     func(tn *store.Tenant) { tn.Versions[1].State = store.StateDisabled },
		"destroyed keeps salt": func(tn *store.Tenant) { tn.Versions[0].State = store.StateDestroyed },
		"current missing":      func(tn *store.Tenant) { tn.Current = 9 },
		"no versions":          func(tn *store.Tenant) { tn.Versions = nil },
	}
	for name, mutate := range cases {
		tn := newTenant(t, "valid-name")
		mutate(tn)
		if err := s.CreateTenant(ctx, tn); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("%s: CreateTenant err = %v, want ErrInvalid", name, err)
		}
		if tn.ID != 0 {
			if _, err := s.GetTenantByID(ctx, tn.ID); !errors.Is(err, store.ErrNotFound) {
				t.Errorf("%s: GetTenantByID after rejected create: err = %v, want ErrNotFound", name, err)
			}
		}
	}
	if err := s.CreateTenant(ctx, nil); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("CreateTenant(nil): err = %v, want ErrInvalid", err)
	}
	if got, err := s.ListTenants(ctx, "", 100); err != nil || len(got) != 0 {
		t.Errorf("ListTenants after rejected creates = %d tenants, %v; want none", len(got), err)
	}
}

func testNotFound(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	mustCreate(t, s, newTenant(t, "present"))
	for _, name := range []string{"absent", "presen", "present0", "", "not/valid"} {
		if _, err := s.GetTenant(ctx, name); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("GetTenant(%q): err = %v, want ErrNotFound", name, err)
		}
	}
	for _, id := range []uint64{0, 1, 1 << 63, ^uint64(0)} {
		if _, err := s.GetTenantByID(ctx, id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("GetTenantByID(%d): err = %v, want ErrNotFound", id, err)
		}
	}
}

// listNames are created in random order; sorted, they exercise byte order
// (digits < upper case < lower case) and prefixes.
var listNames = func() []string {
	names := []string{"0", "9z", "A", "Z.z", "a", "a-", "a.", "a0", "a_", "aa", "b"}
	for i := range 14 {
		names = append(names, fmt.Sprintf("tenant-%02d", i))
	}
	return names
}()

func testListPagination(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	want := slices.Clone(listNames)
	for _, i := range rand.Perm(len(want)) {
		mustCreate(t, s, newTenant(t, want[i]))
	}
	slices.Sort(want)
	for _, limit := range []int{1, 2, 7, len(want) - 1, len(want), len(want) + 1, 1 << 30} {
		var got []string
		after := ""
		for page := 0; ; page++ {
			if page > len(want)+1 {
				t.Fatalf("limit %d: pagination does not end", limit)
			}
			ts, err := s.ListTenants(ctx, after, limit)
			if err != nil {
				t.Fatalf("ListTenants(%q, %d): %v", after, limit, err)
			}
			if len(ts) > limit {
				t.Fatalf("ListTenants(%q, %d) returned %d tenants", after, limit, len(ts))
			}
			if len(ts) == 0 {
				break
			}
			for _, tn := range ts {
				got = append(got, tn.Name)
			}
			after = ts[len(ts)-1].Name
		}
		if !slices.Equal(got, want) {
			t.Errorf("limit %d: pages gave %q, want %q", limit, got, want)
		}
	}
}

func testListLimit(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	for _, name := range []string{"b", "d", "f"} {
		mustCreate(t, s, newTenant(t, name))
	}
	for _, tc := range []struct {
		after string
		want  []string
	}{
		{"", []string{"b", "d", "f"}},
		{"a", []string{"b", "d", "f"}},
		{"b", []string{"d", "f"}},
		{"c", []string{"d", "f"}},
		{"f", nil},
		{"zzz", nil},
	} {
		ts, err := s.ListTenants(ctx, tc.after, 10)
		if err != nil {
			t.Fatalf("ListTenants(%q): %v", tc.after, err)
		}
		var got []string
		for _, tn := range ts {
			got = append(got, tn.Name)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("ListTenants(%q) = %q, want %q", tc.after, got, tc.want)
		}
	}
	for _, limit := range []int{0, -1} {
		if _, err := s.ListTenants(ctx, "", limit); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("ListTenants(limit %d): err = %v, want ErrInvalid", limit, err)
		}
	}
}

func testCopies(t *testing.T, f Factory) {
	s, _ := open(t, f)
	ctx := context.Background()
	in := newTenant(t, "copied")
	mustCreate(t, s, in)
	want := *in
	want.Versions = slices.Clone(in.Versions)
	for i := range want.Versions {
		want.Versions[i].Salt = slices.Clone(in.Versions[i].Salt)
	}

	in.Versions[1].Salt[0] ^= 0xff // the store must not keep the caller's tenant
	in.Versions[0].State = "mutated"
	got := mustGet(t, s, "copied")
	if d := diff(&want, got); d != "" {
		t.Fatalf("mutating the created tenant changed the store: %s", d)
	}
	got.Versions[1].Salt[0] ^= 0xff
	got.Versions[0].State = "mutated"
	got.Versions = append(got.Versions, store.KeyVersion{Version: 7})
	got.Current = 7
	if d := diff(&want, mustGet(t, s, "copied")); d != "" {
		t.Errorf("mutating a GetTenant result changed the store: %s", d)
	}
	byID, err := s.GetTenantByID(ctx, want.ID)
	if err != nil {
		t.Fatalf("GetTenantByID: %v", err)
	}
	byID.Versions[1].KDKVersion = 99
	list, err := s.ListTenants(ctx, "", 10)
	if err != nil || len(list) != 1 {
		t.Fatalf("ListTenants = %d tenants, %v; want 1", len(list), err)
	}
	if d := diff(&want, list[0]); d != "" {
		t.Errorf("mutating a GetTenantByID result changed the store: %s", d)
	}
	list[0].Name = "renamed"
	if d := diff(&want, mustGet(t, s, "copied")); d != "" {
		t.Errorf("mutating a ListTenants result changed the store: %s", d)
	}
}
