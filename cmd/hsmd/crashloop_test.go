package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// crashAck is a ciphertext hsmd acknowledged, with what it must decrypt to.
type crashAck struct {
	tenant string
	ct, pt []byte
}

// crashLoad records what the daemon acknowledged under load.
type crashLoad struct {
	mu       sync.Mutex
	acks     []crashAck
	versions map[string]uint32 // newest version a RotateKey reply named
	calls    map[string]int    // acknowledged calls by kind
	failed   int               // calls that failed (the crash cuts them)
}

// TestCrashLoop starts the real daemon (dev profile), runs mixed load on
// it (encrypt, decrypt, rewrap, rotate, and the audit log's signed
// checkpoints every second), kills it with SIGKILL at a random time,
// restarts it, and after every round checks that every acknowledged
// ciphertext decrypts to its plaintext, every acknowledged rotation is
// there, versions are 1..n with the newest current, and the audit log
// verifies (after every round, and after a final clean stop). Rounds: HSMD_CRASH_ROUNDS (default 3; `make crash` runs 50);
// the seed is logged and HSMD_CRASH_SEED replays it.
func TestCrashLoop(t *testing.T) {
	rounds := 3
	if s := os.Getenv("HSMD_CRASH_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("HSMD_CRASH_ROUNDS=%q", s)
		}
		rounds = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("HSMD_CRASH_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("HSMD_CRASH_SEED=%q", s)
		}
		seed = n
	}
	t.Logf("crash loop: %d rounds, seed %d (HSMD_CRASH_SEED replays it)", rounds, seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	r := newCrashRig(t)
	ctx := context.Background()
	tenants := []string{"alpha", "beta"}
	d := r.start("")
	for _, n := range tenants {
		if _, err := r.ten.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: n}); err != nil {
			t.Fatal(err)
		}
	}
	load := &crashLoad{versions: map[string]uint32{"alpha": 1, "beta": 1}, calls: map[string]int{}}
	var recoveries []time.Duration
	for round := range rounds {
		runFor := time.Duration(200+rng.IntN(1800)) * time.Millisecond
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := range 4 {
			wrng := rand.New(rand.NewPCG(seed+uint64(round), uint64(w)))
			wg.Go(func() { r.crashWorker(load, tenants, wrng, stop) })
		}
		time.Sleep(runFor)
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		d.once.Do(func() {})
		<-d.done
		close(stop)
		wg.Wait()

		t0 := time.Now()
		d = r.start("")
		recoveries = append(recoveries, time.Since(t0))
		r.checkCrashRound(load, round)
		// The log as the crash left it (plus this start's entries) verifies.
		if _, errOut, err := cli(t, r.dir, "", "audit", "verify", "--data-dir", "var"); err != nil {
			t.Errorf("round %d: the audit log does not verify: %v\n%s", round, err, errOut)
		}
		if t.Failed() {
			t.Fatalf("round %d (seed %d) failed\n%s", round, seed, d.out)
		}
	}
	d.stop(t)
	out := mustCLI(t, r.dir, "", "audit", "verify", "--data-dir", "var")
	load.mu.Lock()
	defer load.mu.Unlock()
	t.Logf("crash loop: %d rounds, %d SIGKILLs; acknowledged %v, %d calls cut by the crashes; wrong answers 0, acknowledged writes lost 0; restart to serving p50 %v, max %v\n%s",
		rounds, rounds, load.calls, load.failed, percentile(recoveries, .5), slicesMax(recoveries), out)
}

func slicesMax(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

// crashWorker makes random calls until stop, recording what is
// acknowledged. Calls do not wait for a dead daemon.
func (r *crashRig) crashWorker(l *crashLoad, tenants []string, rng *rand.Rand, stop <-chan struct{}) {
	nowait := grpc.WaitForReady(false)
	for {
		select {
		case <-stop:
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		tenant := tenants[rng.IntN(len(tenants))]
		switch p := rng.IntN(100); {
		case p < 50:
			pt := fmt.Appendf(nil, "%s-%d", tenant, rng.Uint64())
			resp, err := r.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: tenant, Items: []*hsmdv1.EncryptItem{{Plaintext: pt}}}, nowait)
			l.record("encrypt", err, func() { l.acks = append(l.acks, crashAck{tenant, resp.Ciphertexts[0], pt}) })
		case p < 75:
			a, ok := l.pick(rng)
			if !ok {
				break
			}
			resp, err := r.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: a.tenant, Items: []*hsmdv1.DecryptItem{{Ciphertext: a.ct}}}, nowait)
			if err == nil && (resp.Results[0].Error != nil || !bytes.Equal(resp.Results[0].Plaintext, a.pt)) {
				r.t.Errorf("a wrong answer under load: %v", resp.Results[0].Error)
			}
			l.record("decrypt", err, nil)
		case p < 95:
			a, ok := l.pick(rng)
			if !ok {
				break
			}
			resp, err := r.env.Rewrap(ctx, &hsmdv1.RewrapRequest{Tenant: a.tenant, Items: []*hsmdv1.DecryptItem{{Ciphertext: a.ct}}}, nowait)
			if err == nil && resp.Results[0].Error == nil {
				l.record("rewrap", nil, func() { l.acks = append(l.acks, crashAck{a.tenant, resp.Results[0].Ciphertext, a.pt}) })
			} else {
				l.record("rewrap", err, nil)
			}
		default:
			k, err := r.key.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: tenant}, nowait)
			l.record("rotate", err, func() { l.versions[tenant] = max(l.versions[tenant], k.CurrentVersion) })
		}
		cancel()
	}
}

func (l *crashLoad) record(kind string, err error, ack func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.failed++
		return
	}
	l.calls[kind]++
	if ack != nil {
		ack()
	}
}

func (l *crashLoad) pick(rng *rand.Rand) (crashAck, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.acks) == 0 {
		return crashAck{}, false
	}
	return l.acks[rng.IntN(len(l.acks))], true
}

// checkCrashRound checks the invariants after a restart.
func (r *crashRig) checkCrashRound(l *crashLoad, round int) {
	t, ctx := r.t, context.Background()
	l.mu.Lock()
	defer l.mu.Unlock()
	for tenant, acked := range l.versions {
		k, err := r.key.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: tenant})
		if err != nil {
			t.Fatal(err)
		}
		for i, v := range k.Versions {
			if v.Version != uint32(i+1) || v.State != "enabled" {
				t.Errorf("round %d: %s versions %v", round, tenant, k.Versions)
			}
		}
		if k.CurrentVersion != uint32(len(k.Versions)) || k.CurrentVersion < acked {
			t.Errorf("round %d: %s current v%d of %d, an acknowledged rotation made v%d", round, tenant, k.CurrentVersion, len(k.Versions), acked)
		}
	}
	// Every acknowledged ciphertext, in batches per tenant.
	byTenant := map[string][]crashAck{}
	for _, a := range l.acks {
		byTenant[a.tenant] = append(byTenant[a.tenant], a)
	}
	for tenant, as := range byTenant {
		for start := 0; start < len(as); start += 1000 {
			batch := as[start:min(start+1000, len(as))]
			items := make([]*hsmdv1.DecryptItem, len(batch))
			for i, a := range batch {
				items[i] = &hsmdv1.DecryptItem{Ciphertext: a.ct}
			}
			resp, err := r.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: tenant, Items: items})
			if err != nil {
				t.Fatal(err)
			}
			for i, res := range resp.Results {
				if res.Error != nil || !bytes.Equal(res.Plaintext, batch[i].pt) {
					t.Errorf("round %d: an acknowledged ciphertext of %s does not decrypt: %v", round, tenant, res.Error)
				}
			}
		}
	}
}
