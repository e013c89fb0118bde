package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/softhsm"
	"github.com/hsmd/hsmd/tpm"
	"github.com/hsmd/hsmd/tpm/tpmtest"
)

// tpmSetup is a config-file hsmd on a real SoftHSM token and a real swtpm.
type tpmSetup struct {
	dir, conf string
	sw        *tpmtest.Swtpm
}

func newTPMSetup(t *testing.T) *tpmSetup {
	tok := softhsm.NewTestToken(t) // sets SOFTHSM2_CONF, which hsmd inherits
	s := &tpmSetup{dir: t.TempDir(), sw: tpmtest.StartSwtpm(t)}
	s.conf = filepath.Join(s.dir, "hsmd.yaml")
	yaml := fmt.Sprintf(`data_dir: %s/var
listen:
  tcp: 127.0.0.1:0
  metrics: 127.0.0.1:0
hsm:
  module: %s
  token_label: %s
  pin_file: %s
tpm:
  provider: swtpm
  address: %s
`, s.dir, tok.Module, tok.Label, tok.PINFile, s.sw.Address)
	if err := os.WriteFile(s.conf, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *tpmSetup) cmd(t *testing.T, args ...string) *exec.Cmd {
	cmd := exec.Command(hsmdBinary(t), append(args, "--config", s.conf)...)
	cmd.Dir = s.dir
	return cmd
}

// refused runs serve, which must exit non-zero; it returns the output.
func (s *tpmSetup) refused(t *testing.T) string {
	t.Helper()
	cmd := s.cmd(t, "serve")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	cmd.Start()
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("serve started:\n%s", out.String())
		}
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		t.Fatalf("serve neither started nor refused:\n%s", out.String())
	}
	return out.String()
}

func (s *tpmSetup) sock() string { return "unix://" + filepath.Join(s.dir, "var", "hsmd.sock") }

// TestTPMEndToEnd: init seals the PIN to swtpm; serve runs on it; killing
// swtpm does not stop the data plane but health reports it; a power cycle
// brings it back; a restored older copy of the data directory, an offline
// edit and a PCR change are each refused at start, naming what is wrong.
func TestTPMEndToEnd(t *testing.T) {
	s := newTPMSetup(t)
	out, err := s.cmd(t, "init").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "sealed the PIN") {
		t.Fatalf("init: %v\n%s", err, out)
	}
	pinFile := strings.TrimSpace(between(string(mustRead(t, s.conf)), "pin_file: ", "\n"))
	os.Remove(pinFile) // after init the PIN lives only in the TPM
	start := time.Now()
	d := startDaemon(t, s.cmd(t, "serve"))
	t.Logf("start-up with swtpm (unseal, verify, counter advance, HSM login): %v", time.Since(start))
	mustCLI(t, s.dir, "", "tenants", "create", "--addr", s.sock(), "acme")
	ct := mustCLI(t, s.dir, "x", "encrypt", "--addr", s.sock(), "--tenant", "acme", "--text")
	waitTPMHealth(t, s.sock(), healthpb.HealthCheckResponse_SERVING)

	s.sw.Kill()
	if pt := mustCLI(t, s.dir, ct, "decrypt", "--addr", s.sock()); pt != "x" {
		t.Fatalf("decrypt with the TPM gone: %q", pt)
	}
	mustCLI(t, s.dir, "y", "encrypt", "--addr", s.sock(), "--tenant", "acme")
	waitTPMHealth(t, s.sock(), healthpb.HealthCheckResponse_NOT_SERVING)
	if m := scrape(t, d.metrics); !strings.Contains(m, "hsmd_tpm_up 0") || !strings.Contains(m, "hsmd_ready 1") {
		t.Fatalf("metrics with the TPM gone:\n%s", grepLines(m, "hsmd_tpm_up", "hsmd_ready"))
	}
	s.sw.Restart() // a power cycle: PCRs reset, NV kept
	waitTPMHealth(t, s.sock(), healthpb.HealthCheckResponse_SERVING)
	d.stop(t)

	earlier := copyTree(t, filepath.Join(s.dir, "var"))
	startDaemon(t, s.cmd(t, "serve")).stop(t) // this start advances the counter
	if out := mustCLIStatus(t, s); !strings.Contains(out, "sealed secrets:  open") {
		t.Fatalf("tpm status:\n%s", out)
	}

	current := copyTree(t, filepath.Join(s.dir, "var"))
	restoreTree(t, earlier, filepath.Join(s.dir, "var"))
	if out := s.refused(t); !strings.Contains(out, "rollback") || !strings.Contains(out, "hsmd: hint:") {
		t.Fatalf("an earlier copy was not refused clearly:\n%s", out)
	}
	restoreTree(t, current, filepath.Join(s.dir, "var"))

	editTenant(t, filepath.Join(s.dir, "var", "hsmd.db"), "acme")
	if out := s.refused(t); !strings.Contains(out, `tenant "acme"`) {
		t.Fatalf("an offline edit was not named:\n%s", out)
	}
	restoreTree(t, current, filepath.Join(s.dir, "var"))

	extendPCR7(t, s.sw)
	if out := s.refused(t); !strings.Contains(out, "PCR") {
		t.Fatalf("a PCR change was not named:\n%s", out)
	}
}

func mustCLIStatus(t *testing.T, s *tpmSetup) string {
	out, err := s.cmd(t, "tpm", "status").CombinedOutput()
	if err != nil {
		t.Fatalf("tpm status: %v\n%s", err, out)
	}
	return string(out)
}

func extendPCR7(t *testing.T, sw *tpmtest.Swtpm) {
	tp, err := tpm.Open(context.Background(), sw.Config())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	if err := tp.ExtendPCR(context.Background(), 7, []byte("another boot loader")); err != nil {
		t.Fatal(err)
	}
}

// editTenant flips a bit of a tenant's salt, as an attacker with the file
// but not the state key would.
func editTenant(t *testing.T, path, name string) {
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bbolt.Tx) error {
		b := tx.Bucket([]byte("tenants"))
		v := bytes.Clone(b.Get([]byte(name)))
		i := bytes.Index(v, []byte(`"salt":"`)) + len(`"salt":"`)
		v[i] ^= 1 // one base64 character of a version's salt
		return b.Put([]byte(name), v)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func waitTPMHealth(t *testing.T, sock string, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	conn, err := grpc.NewClient(sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: server.TPMService})
		if err == nil && r.Status == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("TPM health %v (%v), want %v", r.GetStatus(), err, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func scrape(t *testing.T, url string) string {
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s string, words ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, w := range words {
			if strings.HasPrefix(l, w) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

func mustRead(t *testing.T, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func between(s, a, b string) string {
	i := strings.Index(s, a)
	if i < 0 {
		return ""
	}
	s = s[i+len(a):]
	if j := strings.Index(s, b); j >= 0 {
		return s[:j]
	}
	return s
}

// copyTree copies the regular files under dir (not sockets) to a new dir.
func copyTree(t *testing.T, dir string) string {
	dst := t.TempDir()
	restoreTree(t, dir, dst)
	return dst
}

// restoreTree makes dst hold exactly src's regular files.
func restoreTree(t *testing.T, src, dst string) {
	t.Helper()
	os.RemoveAll(dst)
	err := filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		switch {
		case fi.IsDir():
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		case !fi.Mode().IsRegular():
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, fi.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTPMCeremonyRootInit: a root-init ceremony on a new data directory with
// swtpm seals the PIN as `hsmd init` does, so serve then starts from the
// TPM alone, and the ceremony's steps are in the audit log.
func TestTPMCeremonyRootInit(t *testing.T) {
	s := newTPMSetup(t)
	if err := os.WriteFile(filepath.Join(s.dir, "init.yaml"), []byte("ceremony: root-init\nid: init\ntranscript: init.transcript\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := s.cmd(t, "ceremony", "run", "init.yaml").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "transcript signed by") {
		t.Fatalf("ceremony run: %v\n%s", err, out)
	}
	pinFile := strings.TrimSpace(between(string(mustRead(t, s.conf)), "pin_file: ", "\n"))
	os.Remove(pinFile) // from now on the PIN lives only in the TPM
	d := startDaemon(t, s.cmd(t, "serve"))
	mustCLI(t, s.dir, "", "tenants", "create", "--addr", s.sock(), "acme")
	d.stop(t)
	n := 0
	for _, e := range verifyAuditDir(t, s.dir) {
		if strings.HasPrefix(e.Op, "ceremony.") {
			n++
		}
	}
	if n < 5 {
		t.Fatalf("%d ceremony entries in the audit log", n)
	}
}
