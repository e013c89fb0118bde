package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// tlsFake is the fake server behind TLS on a loopback port, recording the
// TLS state of the last call.
type tlsFake struct {
	addr  string
	roots *x509.CertPool
	pem   []byte // the server certificate

	mu   sync.Mutex
	last *tls.ConnectionState
}

// startTLSFake serves the fake with TLS; edit, if set, changes the server's
// tls.Config (TLS 1.3, default groups) before it serves.
func startTLSFake(t *testing.T, edit func(*tls.Config)) *tlsFake {
	t.Helper()
	cert, roots, certPEM := testCert(t)
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if edit != nil {
		edit(cfg)
	}
	f := &tlsFake{roots: roots, pem: certPEM}
	record := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if p, ok := peer.FromContext(ctx); ok {
			if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
				f.mu.Lock()
				f.last = &ti.State
				f.mu.Unlock()
			}
		}
		return h(ctx, req)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)), grpc.UnaryInterceptor(record))
	hsmdv1.RegisterEnvelopeServer(srv, &fake{pageSize: 2})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l) //nolint:errcheck // Serve returns when Stop is called.
	t.Cleanup(srv.Stop)
	f.addr = l.Addr().String()
	return f
}

func (f *tlsFake) lastState() *tls.ConnectionState {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last
}

func testCert(t *testing.T) (tls.Certificate, *x509.CertPool, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "hsmd test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool,
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// encryptVia dials addr with opts and makes one call.
func encryptVia(t *testing.T, addr string, opts ...Option) error {
	t.Helper()
	c, err := Dial(t.Context(), addr, opts...)
	if err != nil {
		t.Fatalf("Dial(%q): %v", addr, err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, err = c.EncryptOne(ctx, "t1", Item{Plaintext: []byte("x")})
	return err
}

// TestWithTLSNegotiatesHybrid: the default TLS options get TLS 1.3 and
// X25519MLKEM768 from a server offering every group, by IP and by name.
func TestWithTLSNegotiatesHybrid(t *testing.T) {
	f := startTLSFake(t, nil)
	for _, addr := range []string{f.addr, strings.Replace(f.addr, "127.0.0.1", "localhost", 1)} {
		if err := encryptVia(t, addr, WithTLS(TLSOptions{RootCAs: f.roots})); err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		st := f.lastState()
		if st == nil || st.Version != tls.VersionTLS13 || st.CurveID != tls.X25519MLKEM768 {
			t.Fatalf("%s: negotiated %+v, want TLS 1.3 with X25519MLKEM768", addr, st)
		}
	}
}

// TestWithTLSPQOnly: against a server that offers classical groups only,
// the default options fall back to X25519 and PQOnly refuses.
func TestWithTLSPQOnly(t *testing.T) {
	f := startTLSFake(t, func(c *tls.Config) { c.CurvePreferences = []tls.CurveID{tls.X25519, tls.CurveP256} })
	if err := encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: f.roots})); err != nil {
		t.Fatalf("default options: %v", err)
	}
	if st := f.lastState(); st.CurveID != tls.X25519 {
		t.Fatalf("negotiated %s, want the X25519 fallback", st.CurveID)
	}
	if err := encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: f.roots, PQOnly: true})); status.Code(err) != codes.Unavailable {
		t.Fatalf("PQOnly against a classical server: %v, want Unavailable", err)
	}
	hybrid := startTLSFake(t, func(c *tls.Config) { c.CurvePreferences = []tls.CurveID{tls.SecP256r1MLKEM768} })
	if err := encryptVia(t, hybrid.addr, WithTLS(TLSOptions{RootCAs: hybrid.roots, PQOnly: true})); err != nil {
		t.Fatalf("PQOnly against SecP256r1MLKEM768: %v", err)
	}
	if st := hybrid.lastState(); st.CurveID != tls.SecP256r1MLKEM768 {
		t.Fatalf("negotiated %s", st.CurveID)
	}
	// The second check, should the offered groups ever include a classical one.
	o := TLSOptions{PQOnly: true}
	cfg := o.config("127.0.0.1:1")
	if err := cfg.VerifyConnection(tls.ConnectionState{CurveID: tls.CurveP256}); !errors.Is(err, ErrNotHybrid) {
		t.Fatalf("VerifyConnection(P-256) = %v, want ErrNotHybrid", err)
	}
	for _, g := range cfg.CurvePreferences {
		if g != tls.X25519MLKEM768 && g != tls.SecP256r1MLKEM768 {
			t.Errorf("PQOnly offers %s", g)
		}
	}
}

// TestWithTLSRefuses: TLS 1.2, an untrusted certificate and a wrong name
// are all refused.
func TestWithTLSRefuses(t *testing.T) {
	old := startTLSFake(t, func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS12, tls.VersionTLS12 })
	if err := encryptVia(t, old.addr, WithTLS(TLSOptions{RootCAs: old.roots})); status.Code(err) != codes.Unavailable {
		t.Fatalf("TLS 1.2 server: %v, want Unavailable", err)
	}
	f := startTLSFake(t, nil)
	other := startTLSFake(t, nil)
	for name, o := range map[string]TLSOptions{
		"system roots": {},
		"other CA":     {RootCAs: other.roots},
		"wrong name":   {RootCAs: f.roots, ServerName: "hsmd.example"},
	} {
		if err := encryptVia(t, f.addr, WithTLS(o)); status.Code(err) != codes.Unavailable {
			t.Errorf("%s: %v, want Unavailable", name, err)
		}
	}
	if err := encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: f.roots, ServerName: "localhost"})); err != nil {
		t.Errorf("ServerName localhost: %v", err)
	}
	// Plaintext to a TLS port fails too.
	if err := encryptVia(t, f.addr); status.Code(err) != codes.Unavailable {
		t.Errorf("plaintext to TLS: %v", err)
	}
}

// TestWithTLSOptionsCombine: WithTLS serves a non-loopback TCP address, a
// unix socket ignores it, and WithTransportCredentials given later wins.
func TestWithTLSOptionsCombine(t *testing.T) {
	c, err := Dial(t.Context(), "10.0.0.1:443", WithTLS(TLSOptions{}))
	if err != nil {
		t.Fatalf("Dial with TLS to a non-loopback address: %v", err)
	}
	c.Close()
	_, sock := startFake(t)
	if err := encryptVia(t, "unix://"+sock, WithTLS(TLSOptions{PQOnly: true})); err != nil {
		t.Fatalf("unix socket with WithTLS: %v", err)
	}
	f := startTLSFake(t, nil)
	err = encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: f.roots}), WithTransportCredentials(credentials.NewTLS(&tls.Config{})))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("the later WithTransportCredentials (system roots) did not win: %v", err)
	}
}

func TestLoadRootCAs(t *testing.T) {
	f := startTLSFake(t, nil)
	dir := t.TempDir()
	good := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(good, f.pem, 0o644); err != nil {
		t.Fatal(err)
	}
	pool, err := LoadRootCAs(good)
	if err != nil {
		t.Fatal(err)
	}
	if err := encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: pool})); err != nil {
		t.Fatalf("with the loaded pool: %v", err)
	}
	bad := filepath.Join(dir, "bad.pem")
	if err := os.WriteFile(bad, []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.pem")
	if err := os.WriteFile(big, make([]byte, maxCAFile+1), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{bad, big, filepath.Join(dir, "missing.pem")} {
		if _, err := LoadRootCAs(p); err == nil || !strings.HasPrefix(err.Error(), "hsmd client: ") {
			t.Errorf("LoadRootCAs(%s) = %v, want a prefixed error", filepath.Base(p), err)
		}
	}
}

// TestWithTLSClientCertificate: a certificate loaded by
// LoadClientCertificate is presented to a server that requires one; without
// it the server refuses the handshake; a missing key file is an error
// naming the files.
func TestWithTLSClientCertificate(t *testing.T) {
	f := startTLSFake(t, func(c *tls.Config) { c.ClientAuth = tls.RequireAnyClientCert })
	mine, _, certPEM := testCert(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	pkcs8, err := x509.MarshalPKCS8PrivateKey(mine.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := LoadClientCertificate(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: f.roots, Certificate: cert})); err != nil {
		t.Fatal(err)
	}
	if st := f.lastState(); st == nil || len(st.PeerCertificates) != 1 || !st.PeerCertificates[0].Equal(mine.Leaf) {
		t.Fatalf("the server did not see the client certificate: %+v", st)
	}
	if err := encryptVia(t, f.addr, WithTLS(TLSOptions{RootCAs: f.roots})); status.Code(err) != codes.Unavailable {
		t.Fatalf("without a client certificate: %v, want UNAVAILABLE", err)
	}
	if _, err := LoadClientCertificate(certFile, filepath.Join(dir, "missing.pem")); err == nil ||
		!strings.Contains(err.Error(), "missing.pem") || !strings.HasPrefix(err.Error(), "hsmd client: ") {
		t.Fatalf("missing key file: %v", err)
	}
}
