package etcd_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/etcd"
	"github.com/hsmd/hsmd/store/storetest"
)

// testPrefix returns a key prefix of its own for dir (a t.TempDir), as
// storetest.Factory suggests for a backend without files.
func testPrefix(dir string) string { return "/hsmd-test" + filepath.ToSlash(dir) + "/" }

// openT opens a store under prefix on endpoints, closed at cleanup.
func openT(t *testing.T, endpoints []string, prefix string) *etcd.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := etcd.Open(ctx, etcd.Options{Endpoints: endpoints, Prefix: prefix})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// factory is the conformance suite's factory for a cluster.
func factory(c *etcdtest.Cluster) storetest.Factory {
	return storetest.FactoryFunc(func(t *testing.T, dir string) store.Store {
		return openT(t, c.Endpoints(), testPrefix(dir))
	})
}

// newTenant returns a valid tenant with a random ID and salts.
func newTenant(t *testing.T, name string) *store.Tenant {
	t.Helper()
	var id [8]byte
	rand.Read(id[:])
	salt := make([]byte, store.SaltSize)
	rand.Read(salt)
	now := time.Now()
	return &store.Tenant{
		Name:       name,
		ID:         binary.BigEndian.Uint64(id[:]) | 1,
		Current:    1,
		Versions:   []store.KeyVersion{{Version: 1, KDKVersion: 1, State: store.StateEnabled, Salt: salt, CreateTime: now}},
		CreateTime: now,
	}
}

func create(t *testing.T, s store.Store, tn *store.Tenant) {
	t.Helper()
	if err := s.CreateTenant(context.Background(), tn); err != nil {
		t.Fatalf("CreateTenant(%q): %v", tn.Name, err)
	}
}

// TestSingleMember runs the conformance suite and the store's own tests on
// one single-member cluster. The last two disrupt it: Unavailable stops
// and restarts it, Auth turns authentication on (and off at its end).
func TestSingleMember(t *testing.T) {
	t.Parallel()
	c := etcdtest.Start(t, 1)
	t.Run("Conformance", func(t *testing.T) { storetest.Run(t, factory(c)) })
	t.Run("New", func(t *testing.T) { testNew(t, c) })
	t.Run("Format", func(t *testing.T) { testFormat(t, c) })
	t.Run("Options", func(t *testing.T) { testOptions(t, c) })
	t.Run("BadRecords", func(t *testing.T) { testBadRecords(t, c) })
	t.Run("BadIndex", func(t *testing.T) { testBadIndex(t, c) })
	t.Run("Batch", func(t *testing.T) { testBatch(t, c) })
	t.Run("Unavailable", func(t *testing.T) { testUnavailable(t, c) })
	t.Run("Auth", func(t *testing.T) { testAuth(t, c) })
}

// testNew: a store on the caller's client leaves it open at Close; the
// tenant records are watchable from Revision.
func testNew(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	cli := c.Client(t)
	prefix := testPrefix(t.TempDir())
	if _, err := etcd.New(ctx, cli, strings.TrimSuffix(prefix, "/")); err == nil {
		t.Error("New with a prefix without a trailing / succeeded")
	}
	s, err := etcd.New(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if s.Client() != cli {
		t.Error("Client() is not the client given to New")
	}
	if s.Prefix() != prefix || s.TenantsPrefix() != prefix+"tenants/" {
		t.Errorf("Prefix, TenantsPrefix = %q, %q", s.Prefix(), s.TenantsPrefix())
	}
	rev, err := s.Revision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	w := cli.Watch(wctx, s.TenantsPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	tn := newTenant(t, "watched")
	create(t, s, tn)
	if tn.Revision <= uint64(rev) {
		t.Errorf("created at revision %d, not after Revision() = %d", tn.Revision, rev)
	}
	select {
	case resp := <-w:
		if len(resp.Events) != 1 || string(resp.Events[0].Kv.Key) != s.TenantsPrefix()+"watched" ||
			uint64(resp.Events[0].Kv.ModRevision) != tn.Revision {
			t.Errorf("watch saw %v, want one put of %s at %d", resp.Events, s.TenantsPrefix()+"watched", tn.Revision)
		}
	case <-wctx.Done():
		t.Error("watch of TenantsPrefix saw no event")
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revision(ctx); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Revision after Close: %v, want ErrClosed", err)
	}
	if _, err := cli.Get(ctx, "anything"); err != nil {
		t.Errorf("the caller's client after Close: %v", err)
	}
	s2, err := etcd.New(ctx, cli, prefix)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got, err := s2.GetTenant(ctx, "watched"); err != nil || got.Revision != tn.Revision {
		t.Errorf("GetTenant in a new Store: %v, %v", got, err)
	}
}

// testFormat: Open writes the format version under a prefix without tenant
// keys and refuses a newer one, a malformed one, or tenant keys without
// one.
func testFormat(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	cli := c.Client(t)
	fresh := testPrefix(t.TempDir())
	openT(t, c.Endpoints(), fresh)
	resp, err := cli.Get(ctx, fresh+"version")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "1" {
		t.Fatalf("version key after Open: %v, %v; want 1", resp, err)
	}
	openT(t, c.Endpoints(), fresh) // again: an existing store

	shared := testPrefix(t.TempDir()) // keys of other packages do not matter
	if _, err := cli.Put(ctx, shared+"members/replica-1", "{}"); err != nil {
		t.Fatal(err)
	}
	openT(t, c.Endpoints(), shared)

	for _, tc := range []struct {
		key, value string
		want       error
		wantText   string
	}{
		{"version", fmt.Sprint(etcd.FormatVersion + 1), etcd.ErrVersion, "format version 2"},
		{"version", "one", etcd.ErrFormat, "malformed"},
		{"version", "0", etcd.ErrFormat, "malformed"},
		{"version", strings.Repeat("9", 100), etcd.ErrFormat, "malformed"},
		{"tenants/x", "{}", etcd.ErrFormat, "no format version"},
		{"tenant-ids/0000000000000001", "x", etcd.ErrFormat, "no format version"},
	} {
		prefix := testPrefix(t.TempDir())
		if _, err := cli.Put(ctx, prefix+tc.key, tc.value); err != nil {
			t.Fatal(err)
		}
		s, err := etcd.Open(ctx, etcd.Options{Endpoints: c.Endpoints(), Prefix: prefix})
		if err == nil {
			s.Close()
			t.Errorf("%s = %.20q: Open succeeded", tc.key, tc.value)
			continue
		}
		if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.wantText) {
			t.Errorf("%s = %.20q: Open: %v, want %v saying %q", tc.key, tc.value, err, tc.want, tc.wantText)
		}
	}
}

// testOptions: bad options are refused before connecting, and neither
// errors nor printed Options show a password.
func testOptions(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	const secret = "s3cret-PASSWORD"
	for name, opts := range map[string]etcd.Options{
		"no endpoints":       {},
		"credentials in URL": {Endpoints: []string{"http://root:" + secret + "@127.0.0.1:2379"}},
		"password only":      {Endpoints: c.Endpoints(), Password: secret},
		"prefix without /":   {Endpoints: c.Endpoints(), Prefix: "/hsmd"},
		"negative timeout":   {Endpoints: c.Endpoints(), RequestTimeout: -time.Second},
	} {
		s, err := etcd.Open(ctx, opts)
		if err == nil {
			s.Close()
			t.Errorf("%s: Open succeeded", name)
			continue
		}
		if strings.Contains(err.Error(), secret) {
			t.Errorf("%s: error %q shows the password", name, err)
		}
	}
	opts := etcd.Options{Endpoints: c.Endpoints(), Username: "hsmd", Password: secret}
	for _, format := range []string{"%v", "%+v", "%#v", "%s"} {
		if out := fmt.Sprintf(format, opts); strings.Contains(out, secret) || !strings.Contains(out, "REDACTED") {
			t.Errorf("Sprintf(%q, opts) = %s, want the password REDACTED", format, out)
		}
	}
}

// testBatch: UpdateTenants of MaxBatch tenants is one transaction; more, one
// tenant twice, or more bytes than etcd takes in a request, is refused; a
// failed batch names its first bad tenant. A record over MaxRecordSize is
// refused.
func testBatch(t *testing.T, c *etcdtest.Cluster) {
	ctx := context.Background()
	s := openT(t, c.Endpoints(), testPrefix(t.TempDir()))
	var ts []*store.Tenant
	for i := range etcd.MaxBatch {
		tn := newTenant(t, fmt.Sprintf("t%02d", i))
		create(t, s, tn)
		tn.Policy.MaxDEKsPerVersion = 1000
		ts = append(ts, tn)
	}
	if err := s.UpdateTenants(ctx, append(ts, newTenant(t, "one-too-many"))); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("UpdateTenants of MaxBatch+1: %v, want ErrInvalid", err)
	}
	if err := s.UpdateTenants(ctx, []*store.Tenant{ts[0], ts[1], ts[0]}); !errors.Is(err, store.ErrConflict) ||
		!strings.Contains(err.Error(), `"t00"`) {
		t.Errorf("UpdateTenants with a tenant twice: %v, want ErrConflict naming t00", err)
	}

	ghost := newTenant(t, "ghost")
	ghost.Revision = ts[0].Revision
	moved := *ts[2]
	moved.ID++
	for _, tc := range []struct {
		batch []*store.Tenant
		want  error
		name  string
	}{
		{[]*store.Tenant{ts[0], ghost, ts[1]}, store.ErrNotFound, "ghost"},
		{[]*store.Tenant{ts[0], ts[1], &moved}, store.ErrInvalid, "t02"},
	} {
		if err := s.UpdateTenants(ctx, tc.batch); !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("batch with a bad %s: %v, want %v naming it", tc.name, err, tc.want)
		}
	}
	if got, err := s.GetTenant(ctx, "t00"); err != nil || got.Revision != ts[0].Revision {
		t.Fatalf("a failed batch wrote t00: %v, %v", got, err)
	}

	// Each record fits; together they are over etcd's request limit (1.5
	// MiB), or over the gRPC message limits (2 MiB) too.
	for _, size := range []int{450 << 10, 700 << 10} {
		big := make([]*store.Tenant, 3)
		for i := range big {
			big[i] = newTenant(t, fmt.Sprintf("big-%d-%d", size, i))
			big[i].Versions[0].XWingPublic = make([]byte, size)
			big[i].Versions[0].XWingSealed = []byte{1}
			create(t, s, big[i])
		}
		if err := s.UpdateTenants(ctx, big); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("UpdateTenants of 3 records of %d KiB: %v, want ErrInvalid", size>>10, err)
		}
	}
	huge := newTenant(t, "huge")
	huge.Versions[0].XWingPublic = make([]byte, etcd.MaxRecordSize)
	huge.Versions[0].XWingSealed = []byte{1}
	if err := s.CreateTenant(ctx, huge); !errors.Is(err, store.ErrInvalid) || !strings.Contains(err.Error(), "over the limit") {
		t.Errorf("CreateTenant over MaxRecordSize: %v, want ErrInvalid naming the limit", err)
	}

	if err := s.UpdateTenants(ctx, ts); err != nil {
		t.Fatalf("UpdateTenants of MaxBatch: %v", err)
	}
	for _, tn := range ts {
		got, err := s.GetTenant(ctx, tn.Name)
		if err != nil || got.Revision != ts[0].Revision || got.Policy.MaxDEKsPerVersion != 1000 {
			t.Fatalf("%s after the batch: %+v, %v; want revision %d", tn.Name, got, err, ts[0].Revision)
		}
	}
}
