package etcd_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/etcd"
)

// marker stands for a secret in a bad record: no error may quote it.
const marker = "SECRETMARK"

// recordJSON returns the stored form of tn, as package etcd writes it.
func recordJSON(t *testing.T, tn *store.Tenant) string {
	t.Helper()
	b, err := json.Marshal(map[string]any{"tenant": tn})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// testBadRecords: records written to etcd by something else, malformed,
// oversized or invalid, are refused with store.ErrInvalid by every method
// that reads them, without a panic and without quoting them.
func testBadRecords(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	s := openT(t, c.Endpoints(), testPrefix(t.TempDir()))
	cli := c.Client(t)
	create(t, s, newTenant(t, "good"))

	other := newTenant(t, "other")
	zeroID := newTenant(t, "bad")
	zeroID.ID = 0
	destroyedWithSalt := newTenant(t, "bad")
	destroyedWithSalt.Versions[0].State = store.StateDestroyed
	for name, value := range map[string]string{
		"not JSON":            "{",
		"null":                "null",
		"array":               "[1, 2]",
		"empty object":        "{}",
		"oversized":           strings.Repeat(" ", etcd.MaxRecordSize) + recordJSON(t, newTenant(t, "bad")),
		"another tenant":      recordJSON(t, other),
		"zero ID":             recordJSON(t, zeroID),
		"destroyed with salt": recordJSON(t, destroyedWithSalt),
		"wrong type":          `{"tenant": {"name": "bad", "id": "` + marker + `"}}`,
		"bad salt":            `{"tenant": {"name": "bad", "id": 7, "versions": [{"version": 1, "salt": "` + marker + `!!"}]}}`,
		"trailing garbage":    recordJSON(t, newTenant(t, "bad")) + marker,
	} {
		put, err := cli.Put(ctx, s.TenantsPrefix()+"bad", value)
		if err != nil {
			t.Fatal(err)
		}
		rev := uint64(put.Header.Revision)
		check := func(method string, err error) {
			t.Helper()
			if !errors.Is(err, store.ErrInvalid) {
				t.Errorf("%s: %s: err = %v, want ErrInvalid", name, method, err)
			} else if strings.Contains(err.Error(), marker) {
				t.Errorf("%s: %s: error %q quotes the record", name, method, err)
			}
		}
		_, err = s.GetTenant(ctx, "bad")
		check("GetTenant", err)
		_, err = s.ListTenants(ctx, "", 10)
		check("ListTenants", err)
		check("DeleteTenant", s.DeleteTenant(ctx, "bad", rev))
		if page, err := s.ListTenants(ctx, "bad", 10); err != nil || len(page) != 1 || page[0].Name != "good" {
			t.Errorf("%s: ListTenants after the bad record = %d tenants, %v; want good", name, len(page), err)
		}
	}
	if _, err := cli.Delete(ctx, s.TenantsPrefix()+"bad"); err != nil {
		t.Fatal(err)
	}
	if page, err := s.ListTenants(ctx, "", 10); err != nil || len(page) != 1 {
		t.Errorf("ListTenants once the bad record is gone = %d tenants, %v; want 1", len(page), err)
	}
}

// testBadIndex: an ID index entry that names no tenant, a tenant of another
// ID, or not a valid name, is refused with store.ErrInvalid.
func testBadIndex(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	s := openT(t, c.Endpoints(), testPrefix(t.TempDir()))
	cli := c.Client(t)
	good := newTenant(t, "good")
	create(t, s, good)
	if got, err := s.GetTenantByID(ctx, good.ID); err != nil || got.Name != "good" || got.Revision != good.Revision {
		t.Fatalf("GetTenantByID(good) = %+v, %v", got, err)
	}
	const id = 0x0123456789abcdef
	for _, tc := range []struct{ value, want string }{
		{"missing", `names "missing", which does not exist`},
		{"good", `names "good", whose id is`},
		{"not/valid", "no valid name"},
		{strings.Repeat("a", 100), "no valid name"},
		{"", "no valid name"},
	} {
		if _, err := cli.Put(ctx, fmt.Sprintf("%stenant-ids/%016x", s.Prefix(), uint64(id)), tc.value); err != nil {
			t.Fatal(err)
		}
		_, err := s.GetTenantByID(ctx, id)
		if !errors.Is(err, store.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("index entry %.20q: GetTenantByID: %v, want ErrInvalid saying %q", tc.value, err, tc.want)
		}
	}
}
