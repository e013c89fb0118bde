// Package tpmtest starts TPMs for tests: a swtpm process per test, or the
// in-process simulator. It is a non-test package so that other packages'
// tests can use it. A missing swtpm binary fails the test; it never skips.
package tpmtest

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hsmd/hsmd/tpm"
)

const (
	startTimeout = 10 * time.Second
	stopTimeout  = 5 * time.Second
)

// Swtpm is a swtpm process serving the raw TPM 2.0 command stream on a unix
// socket. Its methods may be called from the test's goroutine only.
type Swtpm struct {
	Address  string // "unix:///…/server.sock", for tpm.Config.Address
	StateDir string // swtpm's --tpmstate directory: NV memory and seeds

	t          testing.TB
	bin        string
	sock, ctrl string
	logPath    string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// StartSwtpm starts swtpm with a fresh state in a temporary directory, waits
// until its server socket accepts connections, and stops it (SIGTERM, then
// SIGKILL) and removes the directory in t.Cleanup. It fails the test if
// swtpm is not installed or does not start.
func StartSwtpm(t testing.TB) *Swtpm {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		t.Fatalf("tpmtest: swtpm is not installed (%v); install the Debian packages swtpm swtpm-tools", err)
	}
	// t.TempDir() can exceed the 108 bytes of a unix socket path: use a short one.
	dir, err := os.MkdirTemp("", "swtpm")
	if err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	s := &Swtpm{
		t:        t,
		bin:      bin,
		StateDir: filepath.Join(dir, "state"),
		sock:     filepath.Join(dir, "server.sock"),
		ctrl:     filepath.Join(dir, "ctrl.sock"),
		logPath:  filepath.Join(dir, "swtpm.log"),
	}
	s.Address = "unix://" + s.sock
	t.Cleanup(func() {
		s.stop()
		os.RemoveAll(dir)
	})
	if err := os.Mkdir(s.StateDir, 0o700); err != nil {
		t.Fatalf("tpmtest: %v", err)
	}
	s.start()
	return s
}

// Config returns a tpm.Config for this swtpm (default PCRs and NV index).
func (s *Swtpm) Config() tpm.Config {
	return tpm.Config{Provider: tpm.ProviderSwtpm, Address: s.Address}
}

// Kill kills swtpm with SIGKILL and waits for it to exit, as a crash would.
func (s *Swtpm) Kill() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// Pause stops swtpm with SIGSTOP: it keeps its connections but answers
// nothing, like a hung TPM, until Resume.
func (s *Swtpm) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused swtpm (SIGCONT).
func (s *Swtpm) Resume() { s.signal(syscall.SIGCONT) }

func (s *Swtpm) signal(sig os.Signal) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		s.t.Fatalf("tpmtest: swtpm is not running")
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("tpmtest: signalling swtpm: %v", err)
	}
}

// Restart stops swtpm if it runs and starts it again on the same state
// directory and sockets: a power cycle. PCRs are reset; NV memory and the
// hierarchy seeds (so the SRK and sealed blobs) persist.
func (s *Swtpm) Restart() {
	s.t.Helper()
	s.stop()
	s.start()
}

func (s *Swtpm) start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	os.Remove(s.sock)
	os.Remove(s.ctrl)
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		s.t.Fatalf("tpmtest: %v", err)
	}
	defer logf.Close()
	cmd := exec.Command(s.bin, "socket", "--tpm2",
		"--tpmstate", "dir="+s.StateDir,
		"--server", "type=unixio,path="+s.sock,
		"--ctrl", "type=unixio,path="+s.ctrl,
		"--flags", "not-need-init,startup-clear")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("tpmtest: starting swtpm: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	if err := s.waitReady(done); err != nil {
		cmd.Process.Kill()
		<-done
		s.cmd = nil
		s.t.Fatalf("tpmtest: swtpm did not start: %v\nswtpm log:\n%s", err, s.log())
	}
}

func (s *Swtpm) waitReady(done <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		conn, err := net.DialTimeout("unix", s.sock, time.Second)
		if err == nil {
			return conn.Close()
		}
		select {
		case <-done:
			return errors.New("swtpm exited")
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return err
		}
	}
}

// stop sends SIGTERM, and SIGKILL if swtpm has not exited after stopTimeout.
func (s *Swtpm) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGCONT) // in case it is paused
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(stopTimeout):
		s.cmd.Process.Kill()
		<-s.done
	}
	s.cmd = nil
}

func (s *Swtpm) log() string {
	b, _ := os.ReadFile(s.logPath)
	return strings.TrimSpace(string(b))
}

// SimulatorConfig returns a tpm.Config for the in-process simulator with the
// given hierarchy seed (default PCRs and NV index). Every Open in one process
// must use the same seed; tests using the simulator must not run in parallel.
func SimulatorConfig(seed int64) tpm.Config {
	return tpm.Config{Provider: tpm.ProviderSimulator, SimulatorSeed: seed}
}
