package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestTLSConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		c    TLSConfig
		want string // "" means valid
	}{
		{TLSConfig{}, ""},
		{TLSConfig{CertFile: "c.pem", KeyFile: "k.pem"}, ""},
		{TLSConfig{CertFile: "c.pem", KeyFile: "k.pem", PQOnly: true}, ""},
		{TLSConfig{CertFile: "c.pem"}, "tls.key_file is required"},
		{TLSConfig{KeyFile: "k.pem"}, "tls.cert_file is required"},
		{TLSConfig{PQOnly: true}, "tls.pq_only needs"},
	} {
		err := tc.c.validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: validate() = %v, want %q", tc.c, err, tc.want)
		}
	}
}

// TestCheckTCPListen: plaintext TCP on loopback only; TLS anywhere.
func TestCheckTCPListen(t *testing.T) {
	on := &TLSConfig{CertFile: "c.pem", KeyFile: "k.pem"}
	for _, tc := range []struct {
		addr string
		tls  *TLSConfig
		ok   bool
	}{
		{"127.0.0.1:7443", &TLSConfig{}, true},
		{"[::1]:7443", &TLSConfig{}, true},
		{"localhost:7443", &TLSConfig{}, true},
		{"0.0.0.0:7443", &TLSConfig{}, false},
		{"10.1.2.3:7443", &TLSConfig{}, false},
		{"0.0.0.0:7443", on, true},
		{"10.1.2.3:7443", on, true},
		{"no-port", on, false},
	} {
		if err := checkTCPListen(tc.addr, tc.tls); (err == nil) != tc.ok {
			t.Errorf("checkTCPListen(%q, tls=%v) = %v", tc.addr, tc.tls.enabled(), err)
		}
	}
}

// TestDevTLS: the dev profile makes a local CA, a server certificate for
// the loopback names and a client certificate for devClientID, requires
// client certificates from that CA, keeps them across starts, makes them
// anew when one nears its end or a file is altered, and leaves a
// configured certificate alone.
func TestDevTLS(t *testing.T) {
	c := &Config{DataDir: t.TempDir()}
	now := time.Now()
	if err := devTLS(c, now, t.Logf); err != nil {
		t.Fatal(err)
	}
	p := devPKIAt(filepath.Join(c.DataDir, "tls"))
	if c.TLS.CertFile != p.cert || c.TLS.KeyFile != p.key || c.TLS.ClientCAFile != p.ca {
		t.Fatalf("TLS = %+v", c.TLS)
	}
	for _, key := range []string{p.key, p.clientKey} {
		if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("key file %s: %v %v", key, fi, err)
		}
	}
	caPEM, err := os.ReadFile(p.ca)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	if matches, _ := filepath.Glob(filepath.Join(c.DataDir, "tls", "*ca*key*")); len(matches) != 0 {
		t.Fatalf("the CA's private key was kept: %v", matches)
	}
	server, err := tls.LoadX509KeyPair(p.cert, p.key)
	if err != nil {
		t.Fatal(err)
	}
	if server.Leaf.IsCA || server.Leaf.PublicKeyAlgorithm != x509.ECDSA {
		t.Fatalf("server certificate: %+v", server.Leaf)
	}
	for _, name := range []string{"127.0.0.1", "::1", "localhost"} {
		if _, err := server.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("the server certificate does not verify for %s: %v", name, err)
		}
	}
	if _, err := server.Leaf.Verify(x509.VerifyOptions{DNSName: "hsmd.example", Roots: roots}); err == nil {
		t.Error("the server certificate verifies for hsmd.example")
	}
	cli, err := tls.LoadX509KeyPair(p.clientCert, p.clientKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("the client certificate does not verify as a client: %v", err)
	}
	if _, err := cli.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Fatal("the client certificate verifies as a server")
	}
	if len(cli.Leaf.URIs) != 1 || cli.Leaf.URIs[0].String() != devClientID {
		t.Fatalf("client identity %v, want %s", cli.Leaf.URIs, devClientID)
	}

	again := &Config{DataDir: c.DataDir}
	if err := devTLS(again, now.Add(24*time.Hour), t.Logf); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p.ca); !bytes.Equal(b, caPEM) {
		t.Fatal("a second start made a new CA")
	}
	if err := devTLS(&Config{DataDir: c.DataDir}, cli.Leaf.NotAfter.Add(-time.Hour), t.Logf); err != nil {
		t.Fatal(err)
	}
	renewed, _ := os.ReadFile(p.ca)
	if bytes.Equal(renewed, caPEM) {
		t.Fatal("certificates near their end were not renewed")
	}
	// A server certificate from elsewhere (here: the old CA's) is replaced.
	other := devPKIAt(t.TempDir())
	if err := other.issue(now); err != nil {
		t.Fatal(err)
	}
	for src, dst := range map[string]string{other.cert: p.cert, other.key: p.key} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if p.valid(now) {
		t.Fatal("a server certificate of another CA passes")
	}
	if err := devTLS(&Config{DataDir: c.DataDir}, now, t.Logf); err != nil || !p.valid(now) {
		t.Fatalf("not reissued: %v", err)
	}

	own := &Config{DataDir: t.TempDir(), TLS: TLSConfig{CertFile: "/etc/hsmd/cert.pem", KeyFile: "/etc/hsmd/key.pem", PQOnly: true}}
	if err := devTLS(own, now, t.Logf); err != nil || own.TLS.CertFile != "/etc/hsmd/cert.pem" || own.TLS.ClientCAFile != "" {
		t.Fatalf("configured TLS changed: %+v %v", own.TLS, err)
	}
	if exists(filepath.Join(own.DataDir, "tls")) {
		t.Fatal("devTLS made a certificate although one is configured")
	}
}

// TestTLSFlags: TLS for TCP addresses only; --plaintext excludes the TLS
// flags; a bad CA file is a usage error naming the flag.
func TestTLSFlags(t *testing.T) {
	env := &cliEnv{stderr: io.Discard, getenv: func(k string) string {
		if k == "HSMD_TLS_CA" {
			return "/nonexistent/ca.pem"
		}
		return ""
	}}
	fs, cf := newClientFlagSet(env, "x", "x")
	if cf.tls.ca != "/nonexistent/ca.pem" {
		t.Fatalf("--tls-ca from HSMD_TLS_CA = %q", cf.tls.ca)
	}
	if opts, err := cf.tls.options("unix:var/hsmd.sock"); err != nil || opts != nil {
		t.Fatalf("unix address: %v %v", opts, err)
	}
	var ue *usageError
	if _, err := cf.tls.options("127.0.0.1:7443"); !errors.As(err, &ue) || !strings.Contains(err.Error(), "--tls-ca") {
		t.Fatalf("missing CA file: %v", err)
	}
	if err := fs.Parse([]string{"--plaintext"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cf.tls.options("127.0.0.1:7443"); !errors.As(err, &ue) {
		t.Fatalf("--plaintext with --tls-ca: %v", err)
	}
	cf.tls.ca = ""
	if opts, err := cf.tls.options("127.0.0.1:7443"); err != nil || opts != nil {
		t.Fatalf("--plaintext: %v %v", opts, err)
	}
	cf.tls.plaintext = false
	if opts, err := cf.tls.options("10.0.0.1:7443"); err != nil || len(opts) != 1 {
		t.Fatalf("TLS with the system roots: %v %v", opts, err)
	}
	cf.tls.cert = "client.pem"
	if _, err := cf.tls.options("10.0.0.1:7443"); !errors.As(err, &ue) || !strings.Contains(err.Error(), "--tls-key") {
		t.Fatalf("--tls-cert without --tls-key: %v", err)
	}
	cf.tls.key = "/nonexistent/client-key.pem"
	if _, err := cf.tls.options("10.0.0.1:7443"); !errors.As(err, &ue) || !strings.Contains(err.Error(), "--tls-cert") {
		t.Fatalf("missing client key file: %v", err)
	}
}

var tcpLine = regexp.MustCompile(`grpc +(127\.0\.0\.1:\d+) \(TLS 1\.3`)

// TestDevServerTLS: `hsmd serve --dev` serves mutual TLS 1.3 on its TCP
// port with the certificates it made; the CLI trusts the dev CA and
// presents the dev client certificate by default, negotiates
// X25519MLKEM768 (counted in the metrics), and fails without TLS or with
// another CA. (TestDevServerAuthz covers the client certificates.)
func TestDevServerTLS(t *testing.T) {
	dir := t.TempDir()
	d := startDaemon(t, serveCmd(t, dir))
	m := tcpLine.FindStringSubmatch(d.out.String())
	if m == nil {
		t.Fatalf("no TLS TCP listener announced:\n%s", d.out)
	}
	addr := m[1]
	mustCLI(t, dir, "", "tenants", "create", "--addr", addr, "demo")
	text := mustCLI(t, dir, "hello", "encrypt", "--addr", addr, "--tls-pq-only", "--tenant", "demo", "--text")
	if pt := mustCLI(t, dir, text, "decrypt", "--addr", "localhost"+addr[strings.LastIndex(addr, ":"):]); pt != "hello" {
		t.Fatalf("decrypted %q", pt)
	}
	if _, errOut, err := cli(t, dir, "", "tenants", "list", "--addr", addr, "--plaintext", "--timeout", "5s"); err == nil {
		t.Fatal("a plaintext call to the TLS port succeeded")
	} else if !strings.Contains(errOut, "hsmd: error:") {
		t.Fatalf("unclear failure: %s", errOut)
	}
	other := devPKIAt(t.TempDir())
	if err := other.issue(time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := cli(t, dir, "", "tenants", "list", "--addr", addr, "--tls-ca", other.ca, "--timeout", "5s"); err == nil {
		t.Fatal("a call trusting another certificate succeeded")
	} else if !strings.Contains(errOut, "hsmd: hint: the TLS handshake failed") {
		t.Fatalf("no TLS hint: %s", errOut)
	}
	metrics := scrape(t, d.metrics)
	if !regexp.MustCompile(`hsmd_tls_handshakes_total\{group="X25519MLKEM768"\} [1-9]`).MatchString(metrics) {
		t.Fatalf("the hybrid handshakes are not counted:\n%s", grepLines(metrics, "hsmd_tls"))
	}
	if !regexp.MustCompile(`hsmd_tls_handshake_failures_total [1-9]`).MatchString(metrics) {
		t.Fatalf("the refused handshakes are not counted:\n%s", grepLines(metrics, "hsmd_tls"))
	}
}
