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

// TestDevTLS: the dev profile makes a self-signed P-256 certificate for the
// loopback names, keeps it across starts, renews it near its end, and
// leaves a configured certificate alone.
func TestDevTLS(t *testing.T) {
	c := &Config{DataDir: t.TempDir()}
	now := time.Now()
	if err := devTLS(c, now, t.Logf); err != nil {
		t.Fatal(err)
	}
	if c.TLS.CertFile != filepath.Join(c.DataDir, "tls", "cert.pem") || c.TLS.KeyFile != filepath.Join(c.DataDir, "tls", "key.pem") {
		t.Fatalf("TLS = %+v", c.TLS)
	}
	if fi, err := os.Stat(c.TLS.KeyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	pair, err := tls.LoadX509KeyPair(c.TLS.CertFile, c.TLS.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	leaf := pair.Leaf
	if leaf.PublicKeyAlgorithm != x509.ECDSA || leaf.IsCA || !bytes.Equal(leaf.RawIssuer, leaf.RawSubject) ||
		leaf.CheckSignature(leaf.SignatureAlgorithm, leaf.RawTBSCertificate, leaf.Signature) != nil {
		t.Fatalf("not a self-signed ECDSA leaf: %+v", leaf)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	for _, name := range []string{"127.0.0.1", "::1", "localhost"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("the certificate does not verify for %s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "hsmd.example", Roots: roots}); err == nil {
		t.Error("the certificate verifies for hsmd.example")
	}
	first, _ := os.ReadFile(c.TLS.CertFile)

	again := &Config{DataDir: c.DataDir}
	if err := devTLS(again, now.Add(24*time.Hour), t.Logf); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(c.TLS.CertFile); !bytes.Equal(b, first) {
		t.Fatal("a second start made a new certificate")
	}
	if err := devTLS(&Config{DataDir: c.DataDir}, leaf.NotAfter.Add(-time.Hour), t.Logf); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(c.TLS.CertFile); bytes.Equal(b, first) {
		t.Fatal("a certificate near its end was not renewed")
	}

	own := &Config{DataDir: t.TempDir(), TLS: TLSConfig{CertFile: "/etc/hsmd/cert.pem", KeyFile: "/etc/hsmd/key.pem", PQOnly: true}}
	if err := devTLS(own, now, t.Logf); err != nil || own.TLS.CertFile != "/etc/hsmd/cert.pem" {
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
}

var tcpLine = regexp.MustCompile(`grpc +(127\.0\.0\.1:\d+) \(TLS 1\.3`)

// TestDevServerTLS: `hsmd serve --dev` serves TLS 1.3 on its TCP port with
// the certificate it made; the CLI trusts that certificate by default,
// negotiates X25519MLKEM768 (counted in the metrics), and fails without
// TLS or with another CA.
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
	other := filepath.Join(t.TempDir(), "other.pem")
	certPEM, _, err := selfSignedCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := cli(t, dir, "", "tenants", "list", "--addr", addr, "--tls-ca", other, "--timeout", "5s"); err == nil {
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
