package server_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/quorum"
)

// TestQuorumDestructiveCalls: with a 2-of-3 quorum policy, ShredTenant and
// ScheduleDestroy run only with two approvals of exactly that operation,
// unexpired and unused.
func TestQuorumDestructiveCalls(t *testing.T) {
	pol := &quorum.Policy{Threshold: 2, MaxValidity: 24 * time.Hour}
	var signers []string
	for i := range 3 {
		name := fmt.Sprintf("op%d", i+1)
		skey, vkey, err := quorum.GenerateKey(nil, name, quorum.KeyEd25519)
		if err != nil {
			t.Fatal(err)
		}
		signers = append(signers, skey)
		pol.Operators = append(pol.Operators, quorum.Operator{Name: name, Key: vkey})
	}
	s := newStack(t, stackOpts{quorum: pol})
	ctx := context.Background()
	approve := func(op quorum.Operation, expires time.Time, n int) []byte {
		t.Helper()
		b, err := quorum.NewRequest(op, expires, nil).MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		for _, sk := range signers[:n] {
			sg, err := quorum.NewSigner(sk)
			if err != nil {
				t.Fatal(err)
			}
			if b, err = quorum.Approve(b, sg); err != nil {
				t.Fatal(err)
			}
		}
		return b
	}
	shredOp := quorum.Operation{Kind: quorum.KindShredTenant, Params: map[string]string{"tenant": "billing"}}
	later := s.clock.Now().Add(time.Hour)
	shred := func(approval []byte) error {
		_, err := s.tenants.ShredTenant(ctx, &hsmdv1.ShredTenantRequest{Name: "billing", Confirm: "billing", Approval: approval})
		return err
	}
	s.createTenant("billing")
	for _, c := range []struct {
		name     string
		approval []byte
		code     codes.Code
		msg      string
	}{
		{"none", nil, codes.PermissionDenied, "quorum-approved"},
		{"one of two", approve(shredOp, later, 1), codes.PermissionDenied, "1 valid approvals of 2"},
		{"another tenant", approve(quorum.Operation{Kind: quorum.KindShredTenant, Params: map[string]string{"tenant": "other"}}, later, 2), codes.PermissionDenied, "another operation"},
	} {
		if err := shred(c.approval); status.Code(err) != c.code || !strings.Contains(status.Convert(err).Message(), c.msg) {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	expiring := approve(shredOp, later, 2)
	s.clock.Add(2 * time.Hour)
	err := shred(expiring)
	s.clock.Add(-2 * time.Hour)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired approval: %v", err)
	}
	if _, err := s.tenants.GetTenant(ctx, &hsmdv1.GetTenantRequest{Name: "billing"}); err != nil {
		t.Fatalf("a refused shred removed the tenant: %v", err)
	}
	good := approve(shredOp, later, 2)
	if err := shred(good); err != nil {
		t.Fatalf("shred with two approvals: %v", err)
	}
	s.createTenant("billing")
	if err := shred(good); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("replayed approval: %v", err)
	}

	s.createTenant("t")
	if _, err := s.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "t"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.keys.DisableVersion(ctx, &hsmdv1.VersionRequest{Tenant: "t", Version: 1}); err != nil {
		t.Fatal(err)
	}
	destroy := func(approval []byte) error {
		_, err := s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "t", Version: 1, WaitSeconds: 7200, Approval: approval})
		return err
	}
	destroyOp := quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{"tenant": "t", "version": "1", "wait_seconds": "7200"}}
	if err := destroy(approve(destroyOp, later, 1)); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("destroy with one approval: %v", err)
	}
	shortWait := quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{"tenant": "t", "version": "1", "wait_seconds": "3600"}}
	if err := destroy(approve(shortWait, later, 2)); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "another operation") {
		t.Fatalf("destroy with an approval for another waiting period: %v", err)
	}
	// A call that would fail anyway (the current version) spends nothing.
	cur := approve(quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{"tenant": "t", "version": "2", "wait_seconds": "7200"}}, later, 2)
	if _, err := s.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: "t", Version: 2, WaitSeconds: 7200, Approval: cur}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("destroy of the current version: %v", err)
	}
	if _, err := pol.Verify(cur, quorum.Operation{Kind: quorum.KindDestroyVersion, Params: map[string]string{"tenant": "t", "version": "2", "wait_seconds": "7200"}}, s.clock.Now()); err != nil {
		t.Fatalf("the approval of a refused call is no longer valid: %v", err)
	}
	if err := destroy(approve(destroyOp, later, 2)); err != nil {
		t.Fatalf("destroy with two approvals: %v", err)
	}
}
