package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/server"
)

type listener struct {
	l       net.Listener
	name    string // as announced
	metrics bool
	witness bool // the tlog-witness HTTP endpoint
}

// listen opens the configured listeners: the unix socket (a stale socket
// file left by a dead hsmd is replaced; a live one is an error), the
// loopback TCP port and the metrics port.
func (d *daemon) listen() ([]listener, error) {
	var ls []listener
	fail := func(err error) ([]listener, error) {
		for _, l := range ls {
			l.l.Close()
		}
		return nil, err
	}
	c := d.cfg.Listen
	if c.Unix != "" {
		l, err := listenUnix(c.Unix)
		if err != nil {
			return fail(err)
		}
		abs, _ := filepath.Abs(c.Unix)
		ls = append(ls, listener{l: l, name: "unix://" + abs})
	}
	for _, a := range []struct {
		addr    string
		metrics bool
	}{{c.TCP, false}, {c.Metrics, true}} {
		if a.addr == "" {
			continue
		}
		if !a.metrics {
			if err := checkTCPListen(a.addr, &d.cfg.TLS); err != nil {
				return fail(err)
			}
		}
		l, err := net.Listen("tcp", a.addr)
		if err != nil {
			return fail(withHint(fmt.Errorf("listen on %s: %w", a.addr, err), "is another hsmd running? choose other ports with --listen-tcp and --listen-metrics"))
		}
		ls = append(ls, listener{l: l, name: l.Addr().String(), metrics: a.metrics})
	}
	if c.Witness != "" {
		l, err := net.Listen("tcp", c.Witness)
		if err != nil {
			return fail(fmt.Errorf("listen.witness %s: %w", c.Witness, err))
		}
		ls = append(ls, listener{l: l, name: l.Addr().String(), witness: true})
	}
	if len(ls) == 0 {
		return nil, errors.New("no listener configured (listen.unix, listen.tcp)")
	}
	return ls, nil
}

// checkLoopback refuses a plaintext TCP listener beyond loopback: until
// mTLS exists, the TCP port has no authentication.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen.tcp %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err != nil || !ip.IsLoopback() {
		return fmt.Errorf("listen.tcp %q: plaintext TCP is served on loopback addresses only", addr)
	}
	return nil
}

func listenUnix(path string) (net.Listener, error) {
	if _, err := os.Stat(path); err == nil {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, withHint(fmt.Errorf("another process is serving on %s", path), "stop the other hsmd, or use another --data-dir")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("listen on %s: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	// The socket is born 0600: no window in which the umask's mode applies.
	// (Umask is process-wide; nothing else creates files while hsmd starts.)
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	return l, nil
}

// announce prints where hsmd listens and a one-line example call.
func (d *daemon) announce(env *cliEnv, ls []listener) {
	w := env.stdout
	fmt.Fprintf(w, "hsmd: serving (data dir %s)\n", d.cfg.DataDir)
	addr := ""
	for _, l := range ls {
		switch {
		case l.metrics:
			fmt.Fprintf(w, "  metrics  http://%s/metrics\n", l.name)
		case l.witness:
			fmt.Fprintf(w, "  witness  http://%s%s\n", l.name, server.AddCheckpointPath)
		case strings.HasPrefix(l.name, "unix://"):
			fmt.Fprintf(w, "  grpc     %s\n", l.name)
			addr = l.name
		default:
			fmt.Fprintf(w, "  grpc     %s (%s)\n", l.name, d.cfg.TLS.describe())
		}
	}
	fmt.Fprint(w, d.cfg.kmsAnnounce())
	bin := os.Args[0]
	if abs, _ := filepath.Abs(filepath.Join(DefaultDataDir, "hsmd.sock")); addr != "" && addr != "unix://"+abs {
		fmt.Fprintf(w, "  env      export HSMD_ADDR=%s\n", addr)
	}
	fmt.Fprintf(w, "  try      %s tenants create demo && echo hello | %s encrypt --tenant demo --text | %s decrypt\n", bin, bin, bin)
}

func newLogger(env *cliEnv, level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewTextHandler(env.stderr, &slog.HandlerOptions{Level: l}))
}

// runInit creates the root keys on a token that has none and checks each;
// with a TPM it seals the PIN and a new state key to it, defines the
// rollback counter and seals the store. It refuses to touch a token that
// has hsmd keys already, or a data directory with sealed secrets.
func runInit(ctx context.Context, env *cliEnv, args []string) error {
	fs := flag.NewFlagSet("hsmd init", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var p profileFlags
	p.register(fs)
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	log := newLogger(env, "info")
	c, dev, err := p.load(func(f string, a ...any) { log.Info(fmt.Sprintf(f, a...)) })
	if err != nil {
		return err
	}
	if !p.dev && !p.insecure {
		if exists(filepath.Join(c.DataDir, localstate.SealedFile)) {
			return withHint(localstate.ErrInitialized, "this data directory is initialised; init never overwrites it")
		}
		if dev.newPIN, err = c.HSM.ReadPIN(); err != nil {
			return err
		}
	}
	if err := initKeysOnly(ctx, c); err != nil {
		return err
	}
	pt, err := bootstrap(ctx, c, p.insecure, true, dev, log)
	if err != nil {
		return err
	}
	defer pt.close()
	fmt.Fprintf(env.stdout, "hsmd: created and checked the root keys on token %q:\n", c.HSM.TokenLabel)
	for _, l := range hsm.RootKeyLabels() {
		fmt.Fprintf(env.stdout, "  %s\n", l)
	}
	if pt.tpm != nil {
		fmt.Fprintf(env.stdout, "hsmd: sealed the PIN and the state key to the TPM (%s); rollback counter at %d\n", pt.tpm.Info(), pt.counter.Value())
		if !p.dev {
			fmt.Fprintln(env.stdout, "hsmd: hsmd serve reads the PIN from the TPM: delete the PIN file now")
		}
	}
	return nil
}

// initKeysOnly creates the root keys with the configured PIN source (before
// the PIN is sealed), refusing a token that has them already. The dev
// profile makes its keys in bootstrap instead.
func initKeysOnly(ctx context.Context, c *Config) error {
	if c.HSM.PINFile == "" && c.HSM.PINFD <= 0 {
		return nil // dev profile: bootstrap creates the keys
	}
	h, err := hsm.Open(ctx, c.HSM)
	if err != nil {
		return withHint(err, "check hsm.module, hsm.token_label and the PIN source")
	}
	defer h.Close()
	if err := h.InitKeys(ctx); err != nil {
		if errors.Is(err, hsm.ErrKeysExist) {
			return withHint(err, "the token already has hsmd root keys; init never overwrites keys")
		}
		return err
	}
	return nil
}
