package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/cluster"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/etcdtest"
	"github.com/hsmd/hsmd/softhsm"
)

// testReplica is one hsmd process of a test cluster.
type testReplica struct {
	name, dir, conf string
	sock, tcp       string
	d               *daemonProc
	c               *client.Client
}

var grpcTCPLine = regexp.MustCompile(`grpc +(127\.0\.0\.1:\d+) `)

const (
	clusterPrefix   = "/hsmd/"
	clusterTTL      = 2
	clusterMaxStale = 3 * time.Second
)

// startReplicas starts n hsmd replicas on the etcd cluster e, each on its
// own SoftHSM token holding the same root keys (as a restore ceremony
// leaves them: hsm.ImportRoots of one root material), without a TPM.
func startReplicas(t testing.TB, e *etcdtest.Cluster, n int) []*testReplica {
	t.Helper()
	m, err := hsm.NewRootMaterial(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rs := make([]*testReplica, n)
	for i := range rs {
		tok := softhsm.NewTestToken(t)
		h, err := hsm.Open(t.Context(), hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile})
		if err != nil {
			t.Fatal(err)
		}
		if err := h.ImportRoots(t.Context(), 1, m); err != nil {
			t.Fatal(err)
		}
		h.Close()
		r := &testReplica{name: fmt.Sprintf("r%d", i+1), dir: t.TempDir()}
		r.sock = filepath.Join(r.dir, "hsmd.sock")
		r.conf = filepath.Join(r.dir, "hsmd.yaml")
		conf := fmt.Sprintf(`data_dir: %s
listen: {unix: %s, tcp: "127.0.0.1:0", metrics: "127.0.0.1:0"}
hsm: {module: %s, token_label: %s, pin_file: %s}
audit: {checkpoint_interval: 1s}
store:
  etcd:
    endpoints: [%s]
    prefix: %s
    replica: %s
    lease_ttl: %d
    max_staleness: %s
`, r.dir, r.sock, tok.Module, tok.Label, tok.PINFile, strings.Join(e.Endpoints(), ", "), clusterPrefix, r.name, clusterTTL, clusterMaxStale)
		if err := os.WriteFile(r.conf, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		rs[i] = r
	}
	var wg sync.WaitGroup
	for _, r := range rs {
		wg.Go(func() { r.start(t) })
	}
	wg.Wait()
	return rs
}

// start starts (or restarts) the replica's process and dials its socket.
func (r *testReplica) start(t testing.TB) {
	cmd := exec.Command(hsmdBinary(t), "serve", "--insecure-no-tpm", "--config", r.conf)
	r.d = startDaemon(t, cmd)
	m := grpcTCPLine.FindStringSubmatch(r.d.out.String())
	if m == nil {
		t.Errorf("%s: no TCP listener announced\n%s", r.name, r.d.out)
		return
	}
	r.tcp = m[1]
	c, err := client.Dial(t.Context(), "unix:"+r.sock)
	if err != nil {
		t.Error(err)
		return
	}
	t.Cleanup(func() { c.Close() })
	r.c = c
}

// kill ends the process with SIGKILL, as a crash.
func (r *testReplica) kill() {
	r.d.once.Do(func() {
		syscall.Kill(-r.d.cmd.Process.Pid, syscall.SIGKILL)
		<-r.d.done
	})
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// TestCluster: three hsmd replicas on a three-member etcd cluster.
// Encrypt on one, decrypt on the others; a rotation on one is in force on
// the others when its call returns (propagation measured); a disabled
// version is refused everywhere at once; tenant creation is unique under
// races between replicas; one etcd member stopped fails no request; with
// etcd's quorum lost, known keys work for max_staleness and key changes
// fail clearly, then everything fails closed, and recovers with the
// quorum; a killed leader's scheduler moves to another replica within the
// lease TTL; every replica's audit log verifies against the checkpoint it
// recorded in etcd.
func TestCluster(t *testing.T) {
	ctx := t.Context()
	e := etcdtest.Start(t, 3)
	rs := startReplicas(t, e, 3)
	r1, r2, r3 := rs[0], rs[1], rs[2]
	if t.Failed() {
		t.FailNow()
	}

	// Encrypt on one, decrypt on the others.
	if _, err := r1.c.CreateTenant(ctx, "shared"); err != nil {
		t.Fatal(err)
	}
	ct, err := r1.c.EncryptOne(ctx, "shared", client.Item{Plaintext: []byte("hello"), Context: map[string]string{"app": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*testReplica{r2, r3} {
		pt, err := r.c.DecryptOne(ctx, "shared", client.CiphertextItem{Ciphertext: ct, Context: map[string]string{"app": "x"}})
		if err != nil || string(pt) != "hello" {
			t.Fatalf("decrypt on %s: %q %v", r.name, pt, err)
		}
	}

	// Tenant creation is unique under races between replicas.
	for i := range 10 {
		name := fmt.Sprintf("race-%d", i)
		errs := make([]error, 2)
		var wg sync.WaitGroup
		for j, r := range []*testReplica{r1, r2} {
			wg.Go(func() { _, errs[j] = r.c.CreateTenant(ctx, name) })
		}
		wg.Wait()
		ok, exists := 0, 0
		for _, err := range errs {
			switch status.Code(err) {
			case codes.OK:
				ok++
			case codes.AlreadyExists:
				exists++
			default:
				t.Fatalf("create %s: %v", name, err)
			}
		}
		if ok != 1 || exists != 1 {
			t.Fatalf("create %s on two replicas: %d created, %d already exists", name, ok, exists)
		}
	}

	// Rotation propagation: the others encrypt under the new version.
	var rotate, propagate []time.Duration
	for range 20 {
		t0 := time.Now()
		k, err := r1.c.RotateKey(ctx, "shared")
		if err != nil {
			t.Fatal(err)
		}
		rotate = append(rotate, time.Since(t0))
		t1 := time.Now()
		for _, r := range []*testReplica{r2, r3} {
			for {
				_, v, err := r.c.Encrypt(ctx, "shared", []client.Item{{Plaintext: []byte("x")}})
				if err != nil {
					t.Fatal(err)
				}
				if v == k.CurrentVersion {
					break
				}
				if time.Since(t1) > time.Second {
					t.Fatalf("%s still encrypts under v%d 1s after rotating to v%d", r.name, v, k.CurrentVersion)
				}
			}
		}
		propagate = append(propagate, time.Since(t0))
	}
	t.Logf("rotation on r1 → new version in force on r2 and r3: p50 %v, p99 %v (RotateKey call p50 %v, p99 %v; 20 rotations)",
		percentile(propagate, .5), percentile(propagate, .99), percentile(rotate, .5), percentile(rotate, .99))

	// A disabled version is refused everywhere when the call returns.
	if _, err := r1.c.DisableVersion(ctx, "shared", 1); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*testReplica{r2, r3} {
		_, err := r.c.DecryptOne(ctx, "shared", client.CiphertextItem{Ciphertext: ct, Context: map[string]string{"app": "x"}})
		if ie := (*client.ItemError)(nil); !errors.As(err, &ie) || ie.Reason != "KEY_DISABLED" {
			t.Fatalf("decrypt under a disabled version on %s: %v, want KEY_DISABLED", r.name, err)
		}
	}
	if _, err := r1.c.EnableVersion(ctx, "shared", 1); err != nil {
		t.Fatal(err)
	}

	load := func(what string) {
		t.Helper()
		for i, r := range rs {
			if r.c == nil {
				continue
			}
			c, err := r.c.EncryptOne(ctx, "shared", client.Item{Plaintext: []byte(what)})
			if err != nil {
				t.Fatalf("%s: encrypt on %s: %v", what, r.name, err)
			}
			other := rs[(i+1)%len(rs)]
			if pt, err := other.c.DecryptOne(ctx, "shared", client.CiphertextItem{Ciphertext: c}); err != nil || string(pt) != what {
				t.Fatalf("%s: decrypt on %s: %q %v", what, other.name, pt, err)
			}
		}
	}

	// One etcd member of three stopped: no failed request.
	e.Stop(0)
	for i := range 20 {
		load(fmt.Sprintf("one member down %d", i))
	}
	if _, err := r2.c.RotateKey(ctx, "shared"); err != nil {
		t.Fatalf("rotate with one etcd member down: %v", err)
	}
	if err := e.Restart(0); err != nil {
		t.Fatal(err)
	}

	// etcd quorum lost: known keys keep working within max_staleness, key
	// changes fail clearly; after it everything fails closed.
	e.Stop(1)
	lost0 := time.Now()
	e.Stop(2) // quorum is lost during it (a member stops gracefully, which may take a while)
	lost := time.Now()
	rotated := make(chan error, 1)
	go func() {
		rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		_, err := r1.c.RotateKey(rctx, "shared")
		rotated <- err
	}()
	load("quorum lost")
	for {
		_, err := r3.c.EncryptOne(ctx, "shared", client.Item{Plaintext: []byte("x")})
		if status.Code(err) == codes.Unavailable {
			served := time.Since(lost)
			t.Logf("known keys served for %v after etcd lost quorum (max_staleness %v), then UNAVAILABLE: %v", served, clusterMaxStale, err)
			if time.Since(lost0) < clusterMaxStale-time.Second || served > clusterMaxStale+2*time.Second {
				t.Errorf("served %v after quorum loss (%v after it began), want about max_staleness %v", served, time.Since(lost0), clusterMaxStale)
			}
			break
		}
		if err != nil {
			t.Fatalf("encrypt without quorum: %v, want success or UNAVAILABLE", err)
		}
		if time.Since(lost) > 3*clusterMaxStale {
			t.Fatalf("still serving %v after etcd lost quorum (max_staleness %v)\n%s", time.Since(lost), clusterMaxStale, grepLines(scrape(t, r3.d.metrics), "hsmd_cluster"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := <-rotated; status.Code(err) != codes.Unavailable {
		t.Fatalf("rotate without an etcd quorum: %v, want UNAVAILABLE", err)
	} else {
		t.Logf("rotate without an etcd quorum: %v", err)
	}
	for _, i := range []int{1, 2} {
		if err := e.Restart(i); err != nil {
			t.Fatal(err)
		}
	}
	// Every replica resumes by itself (each when its cache confirms
	// again), and stays up: five good rounds in a row on all of them.
	back := time.Now()
	var firstGood time.Time
	deadline := time.Now().Add(30 * time.Second)
	for good := 0; good < 5; {
		if good++; good == 1 {
			firstGood = time.Now()
		}
		for _, r := range rs {
			if _, err := r.c.EncryptOne(ctx, "shared", client.Item{Plaintext: []byte("x")}); err != nil {
				good = 0
				if time.Now().After(deadline) {
					t.Fatalf("%s has not recovered 30s after quorum returned: %v", r.name, err)
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("all replicas serve again %v after quorum returned", firstGood.Sub(back))
	load("quorum back")

	// A replica killed: a Go client given every replica's address fails
	// over to another, without a failed call.
	fc, err := client.Dial(ctx, r1.tcp+","+r2.tcp+","+r3.tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	stopLoad := make(chan struct{})
	var okCalls, failedCalls atomic.Int64
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		for {
			select {
			case <-stopLoad:
				return
			default:
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := fc.EncryptOne(cctx, "shared", client.Item{Plaintext: []byte("failover")})
			cancel()
			if err != nil {
				failedCalls.Add(1)
				t.Logf("a call through the failover client failed: %v", err)
			} else {
				okCalls.Add(1)
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	before := okCalls.Load()
	r1.kill()
	r1.c = nil
	time.Sleep(time.Second)
	close(stopLoad)
	<-loadDone
	t.Logf("replica r1 killed under load: the failover client made %d calls before and %d after, %d failed", before, okCalls.Load()-before, failedCalls.Load())
	if okCalls.Load() == before {
		t.Error("no call succeeded after r1 was killed")
	}
	// The one call in flight on r1 when it died may fail (gRPC retries it
	// only if no response had begun); no other may.
	if failedCalls.Load() > 1 {
		t.Errorf("%d calls failed through the failover client, want at most the one in flight", failedCalls.Load())
	}

	// The leader killed: another replica runs the scheduler within the TTL.
	cli := e.Client(t)
	leader := waitLeaderName(t, cli, "r1") // r1 is dead: wait past its lease if it led
	var dead *testReplica
	for _, r := range rs {
		if r.name == leader && r.c != nil {
			dead = r
		}
	}
	t0 := time.Now()
	dead.kill()
	next := waitLeaderName(t, cli, leader)
	t.Logf("leader %s killed (SIGKILL): %s leads after %v (lease TTL %ds)", leader, next, time.Since(t0), clusterTTL)
	if d := time.Since(t0); d > 3*clusterTTL*time.Second {
		t.Errorf("failover took %v", d)
	}
	dead.c = nil

	// The survivor is the member (it registers again after the leases
	// lost with the quorum expire), with its client address. The one
	// member must be the survivor: the dead leader's record lives until
	// its lease expires, and may be alone while the survivor registers
	// again.
	deadline = time.Now().Add(30 * time.Second)
	for {
		st, err := cluster.ReadStatus(ctx, cli, clusterPrefix)
		if err == nil && len(st.Members) == 1 && st.Members[0].Name == next && st.Members[0].Addr != "" && !strings.HasSuffix(st.Members[0].Addr, ":0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("members after the kill: %+v %v", st.Members, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	var live *testReplica
	for _, r := range rs {
		if r.c != nil {
			live = r
		}
	}
	out := mustCLI(t, live.dir, "", "cluster", "status", "--config", live.conf)
	if !strings.Contains(out, "leader:                "+next) || strings.Contains(out, " NO ") || strings.Count(out, "hsmd/r") < 3 || !strings.Contains(out, "not a member now: "+dead.name) || !strings.Contains(out, "not a member now: r1") {
		t.Errorf("cluster status:\n%s", out)
	}
	t.Logf("hsmd cluster status:\n%s", out)
	// Every replica's log, the killed one's too, verifies and holds the
	// checkpoint it published in etcd.
	out = mustCLI(t, live.dir, "", "cluster", "verify-audit", "--config", live.conf, r1.dir, r2.dir, r3.dir)
	if strings.Count(out, "holds the published") != 3 {
		t.Errorf("cluster verify-audit:\n%s", out)
	}
}

// waitLeaderName waits until a replica other than not leads.
func waitLeaderName(t *testing.T, cli *clientv3.Client, not string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := cluster.ReadStatus(t.Context(), cli, clusterPrefix)
		if err == nil && st.Leader != "" && st.Leader != not {
			return st.Leader
		}
		if time.Now().After(deadline) {
			t.Fatalf("no leader other than %q within 30s: %+v %v", not, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// BenchmarkClusterReplicas measures batched encryption (100 × 1 KiB per
// call, 4×GOMAXPROCS callers) against one replica, then spread over two
// replicas of the same cluster: every process (etcd, replicas, callers)
// shares this machine's cores, so it shows the cost of a replica, not the
// scaling of one replica per machine.
func BenchmarkClusterReplicas(b *testing.B) {
	e := etcdtest.Start(b, 3)
	rs := startReplicas(b, e, 2)
	if _, err := rs[0].c.CreateTenant(b.Context(), "bench"); err != nil {
		b.Fatal(err)
	}
	items := make([]client.Item, 100)
	for i := range items {
		items[i] = client.Item{Plaintext: make([]byte, 1024)}
	}
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("replicas=%d", n), func(b *testing.B) {
			var next atomic.Int64
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := rs[int(next.Add(1))%n]
				for pb.Next() {
					if _, _, err := r.c.Encrypt(b.Context(), "bench", items); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N*len(items))/b.Elapsed().Seconds(), "items/s")
		})
	}
}
