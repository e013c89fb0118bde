package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/credentials"

	"github.com/hsmd/hsmd/internal/pqtls"
)

// HybridGroups returns the hybrid post-quantum key exchange groups hsmd
// offers, most preferred first. The slice is the caller's.
func HybridGroups() []tls.CurveID { return pqtls.Hybrid() }

// IsHybridGroup reports whether id is one of [HybridGroups].
func IsHybridGroup(id tls.CurveID) bool { return pqtls.IsHybrid(id) }

// ErrNotHybrid is the handshake error when PQOnly is set and the key
// exchange negotiated is not a hybrid post-quantum group.
var ErrNotHybrid = errors.New("server: tls: the key exchange is not a hybrid post-quantum group (tls.pq_only)")

// TLSOptions configure the TLS of hsmd's TCP listener (see ServerTLSConfig).
type TLSOptions struct {
	// Certificate is the server's certificate chain and private key
	// (tls.LoadX509KeyPair). Required.
	Certificate tls.Certificate
	// PQOnly refuses every handshake that does not negotiate one of
	// HybridGroups. Otherwise the hybrid groups are preferred and X25519
	// and P-256 are accepted from clients that offer nothing better.
	PQOnly bool
	// ClientCAs, if set, makes TLS mutual: every client must present a
	// certificate that chains to one of them, and its first URI SAN (a
	// SPIFFE ID) or else its subject CN is the caller's identity.
	ClientCAs *x509.CertPool
}

// ServerTLSConfig returns hsmd's server TLS configuration: TLS 1.3 only,
// the hybrid key exchanges preferred (or required, with PQOnly), and
// client certificates required and verified if o.ClientCAs is set (none
// asked for otherwise). It fails if o has no certificate.
//
// With PQOnly the key exchange is checked twice: CurvePreferences hold the
// hybrid groups alone, and VerifyConnection refuses anything else (so a
// GODEBUG that drops the hybrid groups makes every handshake fail rather
// than fall back).
func ServerTLSConfig(o TLSOptions) (*tls.Config, error) {
	if len(o.Certificate.Certificate) == 0 || o.Certificate.PrivateKey == nil {
		return nil, errors.New("server: tls: a certificate and its private key are required")
	}
	groups := pqtls.Preferences(o.PQOnly)
	c := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		CurvePreferences: groups,
		Certificates:     []tls.Certificate{o.Certificate},
		ClientAuth:       tls.NoClientCert,
	}
	if o.ClientCAs != nil {
		c.ClientAuth, c.ClientCAs = tls.RequireAndVerifyClientCert, o.ClientCAs
	}
	if o.PQOnly {
		c.VerifyConnection = requireHybrid
	}
	return c, nil
}

// requireHybrid is VerifyConnection under PQOnly.
func requireHybrid(cs tls.ConnectionState) error {
	if cs.Version != tls.VersionTLS13 || !IsHybridGroup(cs.CurveID) {
		return fmt.Errorf("%w: negotiated %s", ErrNotHybrid, cs.CurveID)
	}
	return nil
}

// TLSMetrics count TLS handshakes on hsmd's TCP listener. Its labels are
// key exchange group names (public constants such as "X25519MLKEM768").
// It is safe for concurrent use.
type TLSMetrics struct {
	handshakes *prometheus.CounterVec // group
	failures   prometheus.Counter
}

// NewTLSMetrics registers hsmd_tls_handshakes_total{group} and
// hsmd_tls_handshake_failures_total with reg. It panics if they are already
// registered with reg (as prometheus.MustRegister does).
func NewTLSMetrics(reg prometheus.Registerer) *TLSMetrics {
	m := &TLSMetrics{
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmd_tls_handshakes_total", Help: "Completed TLS handshakes on the gRPC TCP listener, by negotiated key exchange group.",
		}, []string{"group"}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hsmd_tls_handshake_failures_total", Help: "Failed TLS handshakes on the gRPC TCP listener (including refused classical key exchanges under tls.pq_only).",
		}),
	}
	reg.MustRegister(m.handshakes, m.failures)
	for _, g := range pqtls.Preferences(false) {
		m.handshakes.WithLabelValues(g.String()) // export zeros
	}
	return m
}

// TransportCredentials returns the gRPC server credentials of hsmd's
// listeners: a unix socket's callers are identified by their peer
// credentials (as with PeerCredentials) and get no TLS; any other
// connection must complete a TLS handshake under cfg (see
// ServerTLSConfig). Each handshake is counted in m and logged at debug
// level on log; both may be nil. It panics if cfg is nil.
func TransportCredentials(cfg *tls.Config, m *TLSMetrics, log *slog.Logger) credentials.TransportCredentials {
	if cfg == nil {
		panic("server: TransportCredentials: nil tls.Config")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &dispatchCreds{unix: PeerCredentials(), tls: credentials.NewTLS(cfg), cfg: cfg, m: m, log: log}
}

// dispatchCreds picks the credentials by connection type.
type dispatchCreds struct {
	unix credentials.TransportCredentials
	tls  credentials.TransportCredentials
	cfg  *tls.Config
	m    *TLSMetrics
	log  *slog.Logger
}

func (d *dispatchCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if _, ok := conn.(*net.UnixConn); ok {
		return d.unix.ServerHandshake(conn)
	}
	out, ai, err := d.tls.ServerHandshake(conn)
	ctx := context.Background()
	if err != nil {
		if d.m != nil {
			d.m.failures.Inc()
		}
		d.log.LogAttrs(ctx, slog.LevelDebug, "tls handshake failed", slog.String("remote", conn.RemoteAddr().String()), slog.Any("error", err))
		return nil, nil, err
	}
	group := "unknown"
	if ti, ok := ai.(credentials.TLSInfo); ok {
		group = ti.State.CurveID.String()
	}
	if d.m != nil {
		d.m.handshakes.WithLabelValues(group).Inc()
	}
	d.log.LogAttrs(ctx, slog.LevelDebug, "tls handshake", slog.String("remote", conn.RemoteAddr().String()), slog.String("group", group))
	return out, ai, nil
}

// ClientHandshake is not used: these are server credentials.
func (d *dispatchCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return d.tls.ClientHandshake(ctx, authority, conn)
}

func (d *dispatchCreds) Info() credentials.ProtocolInfo { return d.tls.Info() }

func (d *dispatchCreds) Clone() credentials.TransportCredentials {
	c := *d
	c.unix, c.tls = d.unix.Clone(), credentials.NewTLS(d.cfg)
	return &c
}

// OverrideServerName is deprecated in gRPC and has no use on a server.
func (d *dispatchCreds) OverrideServerName(string) error { return nil }
