package etcd_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/store/etcd"
)

// testAuth: with etcd's RBAC on, Open logs in with Username and Password
// and works within the user's prefix; a wrong password or a prefix the user
// may not read is refused, and no error shows a password. It turns auth on
// for the cluster and off again at cleanup.
func testAuth(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	const rootPW, userPW, wrongPW = "root-SECRET-pw", "hsmd-SECRET-pw", "wrong-SECRET-pw"
	prefix := testPrefix(t.TempDir())
	admin := c.Client(t)
	for i, step := range []func() error{
		func() error { _, err := admin.UserAdd(ctx, "root", rootPW); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.UserAdd(ctx, "hsmd", userPW); return err },
		func() error { _, err := admin.RoleAdd(ctx, "hsmd"); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "hsmd", prefix, clientv3.GetPrefixRangeEnd(prefix),
				clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := admin.UserGrantRole(ctx, "hsmd", "hsmd"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatalf("auth set-up step %d: %v", i, err)
		}
	}
	t.Cleanup(func() {
		root, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), Username: "root", Password: rootPW,
			DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Errorf("root login to turn auth off: %v", err)
			return
		}
		defer root.Close()
		if _, err := root.AuthDisable(ctx); err != nil {
			t.Errorf("AuthDisable: %v", err)
		}
	})

	s, err := etcd.Open(ctx, etcd.Options{Endpoints: c.Endpoints(), Prefix: prefix, Username: "hsmd", Password: userPW})
	if err != nil {
		t.Fatalf("Open with the right password: %v", err)
	}
	defer s.Close()
	create(t, s, newTenant(t, "authenticated"))

	for name, tc := range map[string]struct {
		opts etcd.Options
		want error
	}{
		"wrong password": {etcd.Options{Prefix: prefix, Username: "hsmd", Password: wrongPW}, rpctypes.ErrAuthFailed},
		"other prefix":   {etcd.Options{Prefix: "/elsewhere/", Username: "hsmd", Password: userPW}, rpctypes.ErrPermissionDenied},
		"no login":       {etcd.Options{Prefix: prefix}, nil},
	} {
		tc.opts.Endpoints = c.Endpoints()
		s, err := etcd.Open(ctx, tc.opts)
		if err == nil {
			s.Close()
			t.Errorf("%s: Open succeeded", name)
			continue
		}
		if tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%s: Open: %v, want %v", name, err, tc.want)
		}
		for _, pw := range []string{rootPW, userPW, wrongPW} {
			if strings.Contains(err.Error(), pw) {
				t.Errorf("%s: error %q shows a password", name, err)
			}
		}
	}
}
