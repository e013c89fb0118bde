package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"google.golang.org/grpc/credentials"

	"github.com/hsmd/hsmd/internal/pqtls"
)

// maxCAFile caps what [LoadRootCAs] reads.
const maxCAFile = 1 << 20

// ErrNotHybrid is the handshake error when [TLSOptions].PQOnly is set and
// the key exchange negotiated is not a hybrid post-quantum group. Calls see
// it as codes.Unavailable with this text.
var ErrNotHybrid = errors.New("hsmd client: tls: the key exchange is not a hybrid post-quantum group (PQOnly)")

// TLSOptions configure TLS to a TCP address (see [WithTLS]). The zero value
// verifies the server against the system roots and the address's host, and
// prefers the hybrid post-quantum key exchanges (X25519MLKEM768,
// SecP256r1MLKEM768), falling back to X25519 or P-256.
type TLSOptions struct {
	// RootCAs verify the server's certificate; nil means the system roots.
	RootCAs *x509.CertPool
	// ServerName is the name (or IP address) the server's certificate must
	// carry; empty means the host of the address dialled.
	ServerName string
	// PQOnly offers the hybrid groups alone and refuses a connection that
	// negotiated anything else.
	PQOnly bool
	// Certificate, if set, is presented to a server that asks for one
	// (mutual TLS: the server then knows the caller by the certificate's
	// SPIFFE URI SAN or subject CN). See [LoadClientCertificate].
	Certificate *tls.Certificate
}

// WithTLS makes [Dial] speak TLS 1.3 (and nothing older) to a TCP
// address, as configured by o. A unix socket address ignores it: unix
// sockets are protected by file permissions, and the server identifies
// their callers by peer credentials. It overrides an earlier
// [WithTransportCredentials], and the other way round.
func WithTLS(o TLSOptions) Option {
	return func(op *options) { op.tls, op.creds = &o, nil }
}

// LoadRootCAs reads PEM certificates (at most 1 MiB) from path, for
// [TLSOptions].RootCAs. It fails if the file holds no certificate.
func LoadRootCAs(path string) (*x509.CertPool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCAFile+1))
	if err != nil {
		return nil, fmt.Errorf("hsmd client: %w", err)
	}
	if len(b) > maxCAFile {
		return nil, fmt.Errorf("hsmd client: %s is over %d bytes", path, maxCAFile)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("hsmd client: %s holds no PEM certificate", path)
	}
	return pool, nil
}

// LoadClientCertificate reads a PEM certificate chain and its private key
// (PKCS#8, PKCS#1 or SEC 1) for [TLSOptions].Certificate. The error
// names the files, never their contents.
func LoadClientCertificate(certFile, keyFile string) (*tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("hsmd client: client certificate %s with key %s: %w", certFile, keyFile, err)
	}
	return &c, nil
}

// credentials returns the gRPC credentials of o for the TCP address
// host:port.
func (o *TLSOptions) credentials(address string) credentials.TransportCredentials {
	return credentials.NewTLS(o.config(address))
}

func (o *TLSOptions) config(address string) *tls.Config {
	name := o.ServerName
	if name == "" {
		name, _, _ = net.SplitHostPort(address)
	}
	groups := pqtls.Preferences(o.PQOnly)
	c := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		RootCAs:          o.RootCAs,
		ServerName:       name,
		CurvePreferences: groups,
	}
	if o.Certificate != nil {
		c.Certificates = []tls.Certificate{*o.Certificate}
	}
	if o.PQOnly {
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if !pqtls.IsHybrid(cs.CurveID) {
				return fmt.Errorf("%w: negotiated %s", ErrNotHybrid, cs.CurveID)
			}
			return nil
		}
	}
	return c
}
