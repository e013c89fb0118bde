package main

import (
	"context"
	crand "crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
)

// verifyAuditDir runs audit.Verify on the daemon's audit log with the keys
// it published, and returns its entries.
func verifyAuditDir(t *testing.T, dir string) []*audit.Entry {
	t.Helper()
	audit.QuietTessera()
	ad := filepath.Join(dir, "var", "audit")
	vkeys, err := audit.ReadVerifiers(ad)
	if err != nil {
		t.Fatal(err)
	}
	if len(vkeys) != 3 {
		t.Fatalf("%d verifier keys published, want 3 (Ed25519, ECDSA P-256, ML-DSA-44)", len(vkeys))
	}
	vs, err := audit.ParseVerifiers(vkeys)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := audit.Verify(context.Background(), ad, vs)
	if err != nil {
		t.Fatalf("audit verify: %v", err)
	}
	var es []*audit.Entry
	for e, err := range audit.Entries(context.Background(), ad, 0, rep.Size) {
		if err != nil {
			t.Fatal(err)
		}
		es = append(es, e)
	}
	return es
}

// TestAuditSIGKILLUnderLoad kills the daemon with SIGKILL while clients
// encrypt and rotate keys, restarts it (its audit anchor must check out),
// and checks that every acknowledged rotation has its durable entries (the
// request, the key event, the response) and that the log verifies.
func TestAuditSIGKILLUnderLoad(t *testing.T) {
	r := newCrashRig(t)
	ctx := context.Background()
	d := r.start("")
	tenants := []string{"a", "b", "c"}
	for _, tn := range tenants {
		if _, err := r.ten.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: tn}); err != nil {
			t.Fatal(err)
		}
	}
	type acked struct {
		tenant  string
		version uint32
	}
	var mu sync.Mutex
	var rotations []acked
	encrypted := 0
	lctx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for n := 0; lctx.Err() == nil; n++ {
				cctx, cancel := context.WithTimeout(lctx, 5*time.Second)
				_, err := r.env.Encrypt(cctx, &hsmdv1.EncryptRequest{Tenant: tenants[n%3], Items: []*hsmdv1.EncryptItem{
					{Plaintext: []byte("x"), Context: map[string]string{"w": fmt.Sprint(i)}}}})
				cancel()
				if err == nil {
					mu.Lock()
					encrypted++
					mu.Unlock()
				}
			}
		})
	}
	for i := range 2 {
		wg.Go(func() {
			for n := 0; lctx.Err() == nil; n++ {
				tn := tenants[(n+i)%3]
				cctx, cancel := context.WithTimeout(lctx, 5*time.Second)
				k, err := r.key.RotateKey(cctx, &hsmdv1.RotateKeyRequest{Tenant: tn})
				cancel()
				if err == nil {
					mu.Lock()
					rotations = append(rotations, acked{tn, k.CurrentVersion})
					mu.Unlock()
				}
			}
		})
	}
	time.Sleep(time.Duration(800+rand.IntN(700)) * time.Millisecond)
	d.once.Do(func() {}) // killed, not stopped
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	<-d.done
	stopLoad()
	wg.Wait()
	mu.Lock()
	got := append([]acked(nil), rotations...)
	mu.Unlock()
	if len(got) < 3 || encrypted < 10 {
		t.Fatalf("too little load before the kill: %d rotations, %d encryptions", len(got), encrypted)
	}

	d = r.start("") // refuses to start if the log lost anchored entries
	d.stop(t)
	es := verifyAuditDir(t, r.dir)
	type key struct {
		kind, tenant string
		version      uint32
	}
	have := map[key]bool{}
	reqs := map[string]bool{}
	for _, e := range es {
		switch {
		case e.Kind == audit.KindKeyEvent && e.Op == "rotate" && len(e.KeyVersions) == 1:
			have[key{"event", e.Tenant, e.KeyVersions[0]}] = true
		case e.Kind == audit.KindResponse && e.Method == "RotateKey" && e.Code == "OK" && len(e.KeyVersions) == 1:
			have[key{"response", e.Tenant, e.KeyVersions[0]}] = true
			if !reqs[e.RequestID] {
				t.Errorf("response %s has no request entry before it", e.RequestID)
			}
		case e.Kind == audit.KindRequest:
			reqs[e.RequestID] = true
		}
	}
	for _, a := range got {
		for _, k := range []string{"event", "response"} {
			if !have[key{k, a.tenant, a.version}] {
				t.Errorf("acknowledged rotation of %s to v%d has no %s entry", a.tenant, a.version, k)
			}
		}
	}
	t.Logf("killed under load: %d rotations and %d encryptions acknowledged; the log of %d entries verifies, every acknowledged rotation recorded",
		len(got), encrypted, len(es))
}

// TestAuditRollbackRefusedAtStart: an audit log restored from an older copy
// (its own anchor, or the newer anchor over the older, shorter log) is
// refused at start, saying why.
func TestAuditRollbackRefusedAtStart(t *testing.T) {
	r := newCrashRig(t)
	ctx := context.Background()
	d := r.start("")
	if _, err := r.ten.CreateTenant(ctx, &hsmdv1.CreateTenantRequest{Name: "t"}); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
	ad := filepath.Join(r.dir, "var", "audit")
	old := copyTree(t, ad)

	d = r.start("")
	if _, err := r.key.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: "t"}); err != nil {
		t.Fatal(err)
	}
	d.stop(t)
	newAnchor, err := os.ReadFile(filepath.Join(ad, audit.AnchorFile))
	if err != nil {
		t.Fatal(err)
	}

	refused := func(want string) {
		t.Helper()
		cmd := serveCmd(t, r.dir)
		ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		run := exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
		run.Dir = cmd.Dir
		out, err := run.CombinedOutput()
		if err == nil || !strings.Contains(string(out), want) || !strings.Contains(string(out), "hsmd: hint:") {
			t.Fatalf("start with a rolled-back audit log: %v\n%s", err, out)
		}
	}
	// The whole audit directory from the older copy; the refused start
	// adds nothing to it.
	restoreTree(t, old, ad)
	before := mustReadFile(t, filepath.Join(ad, audit.CheckpointsFile))
	refused("older copy")
	if after := mustReadFile(t, filepath.Join(ad, audit.CheckpointsFile)); string(after) != string(before) {
		t.Fatal("a refused start published a checkpoint on the log it refused")
	}
	// The older log with the newer anchor: truncated.
	if err := os.WriteFile(filepath.Join(ad, audit.AnchorFile), newAnchor, 0o600); err != nil {
		t.Fatal(err)
	}
	refused("truncated")
	// The audit directory deleted: refused, unless a new log is asked for.
	if err := os.RemoveAll(ad); err != nil {
		t.Fatal(err)
	}
	refused("missing")
	cmd := serveCmd(t, r.dir)
	cmd.Args = append(cmd.Args, "--new-audit-log")
	startDaemon(t, cmd).stop(t)
}

func mustReadFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var witnessLine = regexp.MustCompile(`witness +(http://\S+)`)

// TestWitnessDaemon: the daemon configured as a witness for one log cosigns
// its growing checkpoints over HTTP (add-checkpoint) and gRPC
// (Audit.SignCheckpoint, with the HSM ECDSA and ML-DSA extras), refuses a
// stale old size with 409 and the size it holds, after a restart too, and
// records each call in its own audit log.
func TestWitnessDaemon(t *testing.T) {
	dir := t.TempDir()
	const origin = "example.com/log"
	skey, vkey, err := note.GenerateKey(crand.Reader, origin)
	if err != nil {
		t.Fatal(err)
	}
	logSigner, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("listen:\n  witness: 127.0.0.1:0\nwitness:\n  logs:\n    - origin: %s\n      key: %s\n", origin, vkey)
	if err := os.WriteFile(filepath.Join(dir, "hsmd.yaml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	serve := func() (*daemonProc, string) {
		cmd := exec.Command(hsmdBinary(t), "serve", "--dev", "--config", "hsmd.yaml", "--data-dir", "./var",
			"--listen-tcp", "127.0.0.1:0", "--listen-metrics", "127.0.0.1:0")
		cmd.Dir = dir
		d := startDaemon(t, cmd)
		m := witnessLine.FindStringSubmatch(d.out.String())
		if m == nil {
			t.Fatalf("no witness endpoint announced\n%s", d.out)
		}
		return d, m[1]
	}
	h := rfc6962.DefaultHasher
	leaves := [][]byte{h.HashLeaf([]byte("e0")), h.HashLeaf([]byte("e1"))}
	checkpoint := func(size int) []byte {
		root := leaves[0]
		if size == 2 {
			root = h.HashChildren(leaves[0], leaves[1])
		}
		n, err := note.Sign(&note.Note{Text: fmt.Sprintf("%s\n%d\n%s\n", origin, size, base64.StdEncoding.EncodeToString(root))}, logSigner)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	post := func(url string, old int, proof [][]byte, cp []byte) (int, string) {
		t.Helper()
		body := fmt.Sprintf("old %d\n", old)
		for _, p := range proof {
			body += base64.StdEncoding.EncodeToString(p) + "\n"
		}
		resp, err := http.Post(url, "text/plain", strings.NewReader(body+"\n"+string(cp)))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	d, url := serve()
	cp1 := checkpoint(1)
	code, body := post(url, 0, nil, cp1)
	if code != http.StatusOK {
		t.Fatalf("add-checkpoint size 1: %d %s", code, body)
	}
	wkeys, err := os.ReadFile(filepath.Join(dir, "var", WitnessVerifiersFile))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(wkeys))
	if len(lines) != 3 {
		t.Fatalf("witness verifiers %q", wkeys)
	}
	cosigV, err := tnote.NewVerifier(lines[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := note.Open(append(cp1, body...), note.VerifierList(cosigV)); err != nil {
		t.Fatalf("the HTTP cosignature does not verify: %v\n%s", err, body)
	}
	if code, body := post(url, 0, nil, cp1); code != http.StatusConflict || body != "1\n" {
		t.Fatalf("stale old size: %d %q", code, body)
	}

	cc, err := grpc.NewClient("unix://"+filepath.Join(dir, "var", "hsmd.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cp2 := checkpoint(2)
	resp, err := hsmdv1.NewAuditClient(cc).SignCheckpoint(context.Background(), &hsmdv1.SignCheckpointRequest{
		OldSize: 1, ConsistencyProof: [][]byte{leaves[1]}, Checkpoint: cp2, HsmEcdsa: true, Mldsa: true})
	if err != nil {
		t.Fatal(err)
	}
	vs := []note.Verifier{cosigV}
	for _, k := range lines[1:] {
		v, err := tnote.NewVerifier(k)
		if err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
	}
	if n, err := note.Open(append(cp2, resp.Signatures...), note.VerifierList(vs...)); err != nil || len(n.Sigs) != 3 {
		t.Fatalf("gRPC signatures: %v\n%s", err, resp.Signatures)
	}
	d.stop(t)

	d, url = serve()
	if code, body := post(url, 1, nil, cp2); code != http.StatusConflict || body != "2\n" {
		t.Fatalf("after a restart, stale old size: %d %q", code, body)
	}
	d.stop(t)
	grpcN, httpN := 0, 0
	for _, e := range verifyAuditDir(t, dir) {
		switch {
		case e.Method == "SignCheckpoint" && strings.Contains(e.Detail, `origin="example.com/log"`):
			grpcN++
		case e.Method == "add-checkpoint" && strings.Contains(e.Detail, `origin="example.com/log"`):
			httpN++
		}
	}
	// Request and response entries: one gRPC call, three HTTP ones.
	if grpcN != 2 || httpN != 6 {
		t.Fatalf("%d SignCheckpoint and %d add-checkpoint entries, want 2 and 6", grpcN, httpN)
	}
}
