package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
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

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/hsmd/hsmd/internal/testutil"
	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/tpm"
)

// These tests drive the real binary, the way the README does, against a
// real SoftHSM token made by the dev profile.

var built struct {
	once sync.Once
	path string
	err  error
}

// hsmdBinary builds hsmd once per test process.
func hsmdBinary(t testing.TB) string {
	t.Helper()
	built.once.Do(func() {
		dir, err := os.MkdirTemp("", "hsmd-e2e-bin-")
		if err != nil {
			built.err = err
			return
		}
		built.path = filepath.Join(dir, "hsmd")
		args := []string{"build", "-o", built.path, "."}
		if raceEnabled {
			args = append(args[:1], append([]string{"-race"}, args[1:]...)...)
		}
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			built.err = &buildError{out: string(out), err: err}
		}
	})
	if built.err != nil {
		t.Fatalf("building hsmd: %v", built.err)
	}
	return built.path
}

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

// daemonProc is a running `hsmd serve`, or `make run`.
type daemonProc struct {
	cmd     *exec.Cmd
	out     *testutil.SyncBuffer // stdout and stderr together
	metrics string               // http://host:port/metrics
	done    chan error
	once    sync.Once
	// viaMake: the process is make, which exits by the signal it forwards;
	// what must exit cleanly is hsmd, its child.
	viaMake bool
}

var metricsLine = regexp.MustCompile(`metrics +(http://\S+/metrics)`)

// startDaemon runs cmd in its own process group and waits for its "try"
// line, which it prints once every listener is up.
func startDaemon(t testing.TB, cmd *exec.Cmd) *daemonProc {
	t.Helper()
	d := &daemonProc{cmd: cmd, out: &testutil.SyncBuffer{}, done: make(chan error, 1)}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	cmd.Stderr = d.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			d.out.Write([]byte(line + "\n"))
			if m := metricsLine.FindStringSubmatch(line); m != nil {
				d.metrics = m[1]
			}
			if strings.Contains(line, " try ") {
				close(ready)
			}
		}
	}()
	go func() { d.done <- cmd.Wait(); pw.Close() }()
	t.Cleanup(func() { d.stop(t) })
	select {
	case <-ready:
	case err := <-d.done:
		t.Fatalf("hsmd exited before serving: %v\n%s", err, d.out)
	case <-time.After(3 * time.Minute):
		t.Fatalf("hsmd did not start in time\n%s", d.out)
	}
	return d
}

// stop sends SIGTERM to the process group and waits for a clean exit.
func (d *daemonProc) stop(t testing.TB) {
	d.once.Do(func() { d.terminate(t) })
}

func (d *daemonProc) terminate(t testing.TB) {
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case err := <-d.done:
		if err != nil && !d.viaMake {
			t.Errorf("hsmd exited with %v after SIGTERM\n%s", err, d.out)
		}
		if d.viaMake && !waitGroupGone(-d.cmd.Process.Pid, 30*time.Second) {
			t.Errorf("hsmd still runs after make exited\n%s", d.out)
		}
	case <-time.After(30 * time.Second):
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		t.Errorf("hsmd did not stop within 30s of SIGTERM\n%s", d.out)
	}
}

// waitGroupGone waits until no process of the group is left.
func waitGroupGone(pgid int, timeout time.Duration) bool {
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if err := syscall.Kill(pgid, 0); err == syscall.ESRCH {
			return true
		}
	}
	return false
}

// cli runs one hsmd client command in dir and returns its stdout.
func cli(t *testing.T, dir, stdin string, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(hsmdBinary(t), args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "HSMD_ADDR=")
	cmd.Stdin = strings.NewReader(stdin)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

func mustCLI(t *testing.T, dir, stdin string, args ...string) string {
	t.Helper()
	out, errOut, err := cli(t, dir, stdin, args...)
	if err != nil {
		t.Fatalf("hsmd %s: %v\n%s", strings.Join(args, " "), err, errOut)
	}
	return out
}

func serveCmd(t *testing.T, dir string) *exec.Cmd {
	cmd := exec.Command(hsmdBinary(t), "serve", "--dev", "--data-dir", "./var",
		"--listen-tcp", "127.0.0.1:0", "--listen-metrics", "127.0.0.1:0")
	cmd.Dir = dir
	return cmd
}

// TestDevServerEndToEnd: the README's client calls against `hsmd serve
// --dev`, a restart, and what the logs never contain.
func TestDevServerEndToEnd(t *testing.T) {
	dir := t.TempDir()
	d := startDaemon(t, serveCmd(t, dir))
	if fi, err := os.Stat(filepath.Join(dir, "var", "hsmd.sock")); err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	mustCLI(t, dir, "", "tenants", "create", "demo")
	text := mustCLI(t, dir, "hello\n", "encrypt", "--tenant", "demo", "--text", "--context", "app=billing")
	if !strings.HasPrefix(text, "hsmd:v1:") {
		t.Fatalf("text form: %q", text)
	}
	if pt := mustCLI(t, dir, text, "decrypt", "--context", "app=billing"); pt != "hello\n" {
		t.Fatalf("decrypted %q", pt)
	}
	_, errOut, err := cli(t, dir, text, "decrypt", "--context", "app=other")
	if err == nil || strings.TrimSpace(errOut) != "hsmd: error: decryption failed" {
		t.Fatalf("wrong context: %v %q", err, errOut)
	}
	checkMetrics(t, d.metrics)
	d.stop(t)

	// Restart: what was encrypted before still decrypts.
	d = startDaemon(t, serveCmd(t, dir))
	if pt := mustCLI(t, dir, text, "decrypt", "--tenant", "demo", "--context", "app=billing"); pt != "hello\n" {
		t.Fatalf("after restart: %q", pt)
	}
	d.stop(t)
	checkNoSecrets(t, dir, d.out.String())
}

func checkMetrics(t *testing.T, url string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{`hsmd_hsm_calls_total{op="hmac",result="ok"} 1`, `hsmd_requests_total{code="OK",method="Encrypt"} 1`, `hsmd_ready 1`,
		"hsmd_hsm_recoveries_total 0", "hsmd_hsm_recovering 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// checkNoSecrets: the dev token's PIN, unsealed here from the simulator,
// is in no file of the data directory and not in what hsmd printed.
func checkNoSecrets(t *testing.T, dir, out string) {
	t.Helper()
	data := filepath.Join(dir, "var")
	cfg, err := devSimulator(data)
	if err != nil {
		t.Fatal(err)
	}
	tp, err := tpm.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	s, err := localstate.Unseal(context.Background(), tp, data)
	if err != nil {
		t.Fatal(err)
	}
	pin, _ := s.PIN()
	if len(pin) < 16 || strings.Contains(out, string(pin)) {
		t.Fatal("the PIN is in hsmd's output (or too short to check)")
	}
	err = filepath.Walk(data, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() || fi.Mode()&os.ModeSocket != 0 {
			return err
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, pin) {
			t.Errorf("the PIN is in plaintext in %s", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestServeRefusesWrongPIN: with a wrong PIN the daemon does not start, and
// says why without printing the PIN. (The dev profile without a TPM keeps
// its PIN in a file, which the test overwrites.)
func TestServeRefusesWrongPIN(t *testing.T) {
	dir := t.TempDir()
	insecure := func() *exec.Cmd {
		cmd := serveCmd(t, dir)
		cmd.Args = append(cmd.Args, "--insecure-no-tpm")
		return cmd
	}
	d := startDaemon(t, insecure())
	if m := scrape(t, d.metrics); !strings.Contains(m, "hsmd_tpm_insecure 1") || !strings.Contains(d.out.String(), "WITHOUT a TPM") {
		t.Fatalf("--insecure-no-tpm is not shown:\n%s", grepLines(m, "hsmd_tpm"))
	}
	waitTPMHealth(t, "unix://"+filepath.Join(dir, "var", "hsmd.sock"), healthpb.HealthCheckResponse_NOT_SERVING)
	d.stop(t)
	pinFile := filepath.Join(dir, "var", "softhsm", "user.pin")
	right, _ := os.ReadFile(pinFile)
	wrong := "0123456789abcdef0123456789abcdef"
	if err := os.WriteFile(pinFile, []byte(wrong+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := insecure()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	go func() { <-ctx.Done(); cmd.Process.Kill() }()
	err := cmd.Run()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("serve with a wrong PIN: %v\n%s", err, out.String())
	}
	msg := out.String()
	if !strings.Contains(msg, "hsmd: error:") || !strings.Contains(strings.ToLower(msg), "login") {
		t.Fatalf("unclear refusal:\n%s", msg)
	}
	if strings.Contains(msg, wrong) || strings.Contains(msg, strings.TrimSpace(string(right))) {
		t.Fatalf("a PIN is in the output:\n%s", msg)
	}
}

// TestMakeRun drives the README's first command, `make run`, and a client
// call against it.
func TestMakeRun(t *testing.T) {
	dir := t.TempDir()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("make", "--no-print-directory", "-C", root, "run", "DATA_DIR="+filepath.Join(dir, "var"),
		"RUN_FLAGS=--listen-tcp 127.0.0.1:0 --listen-metrics 127.0.0.1:0")
	d := startDaemon(t, cmd)
	d.viaMake = true
	sock := "unix://" + filepath.Join(dir, "var", "hsmd.sock")
	mustCLI(t, dir, "", "tenants", "create", "--addr", sock, "demo")
	text := mustCLI(t, dir, "hello", "encrypt", "--addr", sock, "--tenant", "demo", "--text")
	if pt := mustCLI(t, dir, text, "decrypt", "--addr", sock); pt != "hello" {
		t.Fatalf("decrypted %q", pt)
	}
	d.stop(t)
	if !strings.Contains(d.out.String(), "msg=stopping") {
		t.Fatalf("hsmd did not stop gracefully:\n%s", d.out)
	}
}
