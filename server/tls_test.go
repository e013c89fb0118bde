package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/hsmd/hsmd/server"
)

// testServerCert is a self-signed P-256 certificate for 127.0.0.1 and
// localhost, and a pool that trusts it.
func testServerCert(t testing.TB) (tls.Certificate, *x509.CertPool) {
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
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// tlsServer is a gRPC server (health service only) with hsmd's transport
// credentials, on a loopback TCP port and a unix socket. It records the
// server-side AuthInfo of the last call.
type tlsServer struct {
	tcp, sock string
	roots     *x509.CertPool
	reg       *prometheus.Registry

	mu   sync.Mutex
	last credentials.AuthInfo
}

func startTLSServer(t *testing.T, cfg *tls.Config, roots *x509.CertPool) *tlsServer {
	t.Helper()
	s := &tlsServer{roots: roots, reg: prometheus.NewRegistry()}
	creds := server.TransportCredentials(cfg, server.NewTLSMetrics(s.reg), nil)
	record := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if p, ok := peer.FromContext(ctx); ok {
			s.mu.Lock()
			s.last = p.AuthInfo
			s.mu.Unlock()
		}
		return h(ctx, req)
	}
	g := grpc.NewServer(grpc.Creds(creds), grpc.UnaryInterceptor(record))
	healthpb.RegisterHealthServer(g, health.NewServer())
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.sock = filepath.Join(t.TempDir(), "s.sock")
	ul, err := net.Listen("unix", s.sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(tl)
	go g.Serve(ul)
	t.Cleanup(g.Stop)
	s.tcp = tl.Addr().String()
	return s
}

func (s *tlsServer) lastAuth() credentials.AuthInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// check makes a health call to target with creds and returns the
// client-side peer.
func check(t *testing.T, target string, creds credentials.TransportCredentials) (*peer.Peer, error) {
	t.Helper()
	cc, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var p peer.Peer
	_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p))
	return &p, err
}

func newServerTLS(t *testing.T, pqOnly bool) (*tls.Config, *x509.CertPool) {
	t.Helper()
	cert, roots := testServerCert(t)
	cfg, err := server.ServerTLSConfig(server.TLSOptions{Certificate: cert, PQOnly: pqOnly})
	if err != nil {
		t.Fatal(err)
	}
	return cfg, roots
}

// TestTLSKeyExchange: real handshakes on loopback. The default client gets
// X25519MLKEM768; classical-only clients are accepted unless pq_only, and
// every negotiated group is counted.
func TestTLSKeyExchange(t *testing.T) {
	clients := []struct {
		name   string
		curves []tls.CurveID
		want   tls.CurveID // negotiated without pq_only
		pq     bool        // accepted under pq_only
	}{
		{"default", nil, tls.X25519MLKEM768, true},
		{"X25519 alone", []tls.CurveID{tls.X25519}, tls.X25519, false},
		{"P-256 alone", []tls.CurveID{tls.CurveP256}, tls.CurveP256, false},
		{"SecP256r1MLKEM768 alone", []tls.CurveID{tls.SecP256r1MLKEM768}, tls.SecP256r1MLKEM768, true},
		{"classical and X25519MLKEM768", []tls.CurveID{tls.X25519, tls.CurveP256, tls.X25519MLKEM768}, tls.X25519MLKEM768, true},
	}
	for _, pqOnly := range []bool{false, true} {
		cfg, roots := newServerTLS(t, pqOnly)
		s := startTLSServer(t, cfg, roots)
		counts := map[string]float64{}
		for _, c := range clients {
			creds := credentials.NewTLS(&tls.Config{RootCAs: s.roots, CurvePreferences: c.curves})
			p, err := check(t, s.tcp, creds)
			if pqOnly && !c.pq {
				if status.Code(err) != codes.Unavailable {
					t.Errorf("pq_only, %s client: %v, want refused (Unavailable)", c.name, err)
				}
				continue
			}
			if err != nil {
				t.Errorf("pq_only=%v, %s client: %v", pqOnly, c.name, err)
				continue
			}
			ti, ok := p.AuthInfo.(credentials.TLSInfo)
			if !ok || ti.State.CurveID != c.want || ti.State.Version != tls.VersionTLS13 {
				t.Errorf("pq_only=%v, %s client: negotiated %+v, want %s over TLS 1.3", pqOnly, c.name, p.AuthInfo, c.want)
				continue
			}
			if sti, ok := s.lastAuth().(credentials.TLSInfo); !ok || sti.State.CurveID != c.want {
				t.Errorf("pq_only=%v, %s client: the server saw %+v", pqOnly, c.name, s.lastAuth())
			}
			counts[c.want.String()]++
		}
		for _, g := range []tls.CurveID{tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.X25519, tls.CurveP256} {
			got := metricValue(t, s.reg, "hsmd_tls_handshakes_total", map[string]string{"group": g.String()})
			if got != counts[g.String()] {
				t.Errorf("pq_only=%v: hsmd_tls_handshakes_total{group=%q} = %v, want %v", pqOnly, g, got, counts[g.String()])
			}
		}
		failures := metricValue(t, s.reg, "hsmd_tls_handshake_failures_total", nil)
		if pqOnly && failures < 2 || !pqOnly && failures != 0 {
			t.Errorf("pq_only=%v: hsmd_tls_handshake_failures_total = %v", pqOnly, failures)
		}
	}
}

// TestTLSPQOnlyVerifyConnection: under pq_only, a classical key exchange is
// refused even when the curve preferences let one through (as a GODEBUG
// or a later edit might).
func TestTLSPQOnlyVerifyConnection(t *testing.T) {
	cfg, roots := newServerTLS(t, true)
	if err := cfg.VerifyConnection(tls.ConnectionState{Version: tls.VersionTLS13, CurveID: tls.X25519}); !errors.Is(err, server.ErrNotHybrid) {
		t.Fatalf("VerifyConnection(X25519) = %v, want ErrNotHybrid", err)
	}
	if err := cfg.VerifyConnection(tls.ConnectionState{Version: tls.VersionTLS13, CurveID: tls.SecP256r1MLKEM768}); err != nil {
		t.Fatalf("VerifyConnection(SecP256r1MLKEM768) = %v", err)
	}
	cfg.CurvePreferences = append(cfg.CurvePreferences, tls.X25519)
	s := startTLSServer(t, cfg, roots)
	if _, err := check(t, s.tcp, credentials.NewTLS(&tls.Config{RootCAs: roots, CurvePreferences: []tls.CurveID{tls.X25519}})); status.Code(err) != codes.Unavailable {
		t.Fatalf("classical client through widened preferences: %v, want refused", err)
	}
	if _, err := check(t, s.tcp, credentials.NewTLS(&tls.Config{RootCAs: roots})); err != nil {
		t.Fatalf("default client: %v", err)
	}
}

// TestTLS12Refused: the TCP listener speaks TLS 1.3 only.
func TestTLS12Refused(t *testing.T) {
	cfg, roots := newServerTLS(t, false)
	s := startTLSServer(t, cfg, roots)
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", s.tcp, &tls.Config{RootCAs: roots, MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}})
	if err == nil {
		c.Close()
		t.Fatal("a TLS 1.2 handshake succeeded")
	}
	c, err = tls.DialWithDialer(d, "tcp", s.tcp, &tls.Config{RootCAs: roots, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("TLS 1.3 handshake: %v", err)
	}
	if st := c.ConnectionState(); st.Version != tls.VersionTLS13 || st.CurveID != tls.X25519MLKEM768 {
		t.Errorf("negotiated version %x, group %s", st.Version, st.CurveID)
	}
	c.Close()
	if cfg.MinVersion != tls.VersionTLS13 {
		t.Errorf("MinVersion = %x", cfg.MinVersion)
	}
}

// TestTLSUnixSocketKeepsPeerCredentials: with TLS on TCP, a unix socket
// caller is still identified by its peer credentials (the audit log's
// "unix:uid=…"), and a plaintext TCP caller gets nowhere.
func TestTLSUnixSocketKeepsPeerCredentials(t *testing.T) {
	cfg, roots := newServerTLS(t, false)
	s := startTLSServer(t, cfg, roots)
	if _, err := check(t, "unix://"+s.sock, insecure.NewCredentials()); err != nil {
		t.Fatalf("unix socket: %v", err)
	}
	ai, ok := s.lastAuth().(server.PeerCredAuthInfo)
	if !ok || ai.UID != uint32(os.Getuid()) || ai.GID != uint32(os.Getgid()) || ai.PID != int32(os.Getpid()) {
		t.Fatalf("unix caller's identity = %#v, want uid %d", s.lastAuth(), os.Getuid())
	}
	if _, err := check(t, s.tcp, insecure.NewCredentials()); status.Code(err) != codes.Unavailable {
		t.Fatalf("plaintext TCP call: %v, want Unavailable", err)
	}
}

func TestServerTLSConfigNeedsCertificate(t *testing.T) {
	if _, err := server.ServerTLSConfig(server.TLSOptions{}); err == nil {
		t.Fatal("ServerTLSConfig accepted no certificate")
	}
	cfg, _ := newServerTLS(t, false)
	if cfg.VerifyConnection != nil || cfg.ClientAuth != tls.NoClientCert {
		t.Fatal("without pq_only: unexpected VerifyConnection or client auth")
	}
	pq, _ := newServerTLS(t, true)
	for _, g := range pq.CurvePreferences {
		if !server.IsHybridGroup(g) {
			t.Errorf("pq_only offers %s", g)
		}
	}
	if hg := server.HybridGroups(); len(hg) != 2 || hg[0] != tls.X25519MLKEM768 || hg[1] != tls.SecP256r1MLKEM768 {
		t.Fatalf("HybridGroups() = %v", hg)
	}
}
