package server_test

import (
	"context"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

func TestTenants(t *testing.T) {
	s := newStack(t, stackOpts{})
	ctx := context.Background()
	a := s.createTenant("acme")
	if a.CurrentVersion != 1 || len(a.Versions) != 1 || a.Versions[0].KdkVersion != 1 || a.Versions[0].State != "enabled" || a.Id == "" {
		t.Fatalf("new tenant: %+v", a)
	}
	if _, err := s.tenants.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: "acme"}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("duplicate: %v", err)
	}
	for _, bad := range []string{"", "-x", "a b", "ü", string(make([]byte, 65))} {
		if _, err := s.tenants.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: bad}); status.Code(err) != codes.InvalidArgument {
			t.Errorf("name %q: %v", bad, err)
		}
	}
	got, err := s.tenants.GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: "acme"})
	if err != nil || got.Id != a.Id {
		t.Fatalf("get: %v %+v", err, got)
	}
	if _, err := s.tenants.GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: "nobody"}); status.Code(err) != codes.NotFound {
		t.Fatalf("get unknown: %v", err)
	}
	for i := range 7 {
		s.createTenant(fmt.Sprintf("t%02d", i))
	}
	var names []string
	token := ""
	for pages := 0; ; pages++ {
		r, err := s.tenants.ListTenants(ctx, &hsmdv1.ListTenantsRequest{PageSize: 3, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, tn := range r.Tenants {
			names = append(names, tn.Name)
		}
		if token = r.NextPageToken; token == "" {
			break
		}
		if pages > 10 {
			t.Fatal("pagination does not end")
		}
	}
	want := "[acme t00 t01 t02 t03 t04 t05 t06]"
	if fmt.Sprint(names) != want {
		t.Fatalf("listed %v, want %s", names, want)
	}
	if _, err := s.tenants.ListTenants(ctx, &hsmdv1.ListTenantsRequest{PageSize: 5000}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("page size over the limit: %v", err)
	}
	if _, err := s.tenants.ListTenants(ctx, &hsmdv1.ListTenantsRequest{PageToken: "!!"}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("bad page token: %v", err)
	}
}
