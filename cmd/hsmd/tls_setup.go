package main

// TLS of the gRPC TCP listener: the tls: configuration section, the dev
// profile's self-signed certificate, the server credentials, and the
// client commands' TLS flags.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/server"
)

const (
	// devTLSDir holds the dev profile's certificate, under the data dir.
	devTLSDir = "tls"
	// devCertLifetime is the dev certificate's validity; it is made anew
	// once less than devCertRenew of it is left.
	devCertLifetime = 365 * 24 * time.Hour
	devCertRenew    = 7 * 24 * time.Hour
)

// TLSConfig is the tls: section: the certificate of the gRPC TCP listener,
// which then speaks TLS 1.3 only, preferring the hybrid post-quantum key
// exchanges. Without it the TCP listener is plaintext and loopback only.
// The unix socket, the metrics and the witness endpoints never use it.
type TLSConfig struct {
	CertFile string `yaml:"cert_file"` // PEM certificate chain, leaf first
	KeyFile  string `yaml:"key_file"`  // PEM private key (PKCS #8, EC or PKCS #1), mode 0600
	// PQOnly refuses every handshake that does not negotiate a hybrid
	// post-quantum group (X25519MLKEM768, SecP256r1MLKEM768).
	PQOnly bool `yaml:"pq_only"`
	// ClientCAFile, if set, makes TLS mutual: clients must present a
	// certificate from one of these PEM CAs; its first URI SAN (SPIFFE
	// ID) or else its subject CN ("cn:NAME") is the caller's identity.
	ClientCAFile string `yaml:"client_ca_file"`
}

func (t *TLSConfig) enabled() bool { return t.CertFile != "" || t.KeyFile != "" }

// validate checks the section's shape; the files are read at serve.
func (t *TLSConfig) validate() error {
	switch {
	case t.CertFile == "" && t.KeyFile != "":
		return errors.New("tls.cert_file is required with tls.key_file")
	case t.CertFile != "" && t.KeyFile == "":
		return errors.New("tls.key_file is required with tls.cert_file")
	case t.PQOnly && !t.enabled():
		return errors.New("tls.pq_only needs tls.cert_file and tls.key_file")
	case t.ClientCAFile != "" && !t.enabled():
		return errors.New("tls.client_ca_file needs tls.cert_file and tls.key_file")
	}
	return nil
}

// describe is how announce shows the TCP listener.
func (t *TLSConfig) describe() string {
	switch {
	case !t.enabled():
		return "plaintext, loopback only"
	case t.PQOnly:
		return "TLS 1.3, hybrid post-quantum key exchange only"
	default:
		return "TLS 1.3, hybrid post-quantum key exchange preferred"
	}
}

// transportOptions returns the grpc.Creds of the daemon's listeners when
// tls: is set (the unix socket keeps its peer-credential identity), none
// otherwise. The TLS handshake metrics are registered with d.reg.
func (d *daemon) transportOptions() ([]grpc.ServerOption, error) {
	t := d.cfg.TLS
	if !t.enabled() {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, withHint(fmt.Errorf("tls: %w", err), "tls.cert_file and tls.key_file must name a PEM certificate chain and its private key")
	}
	if fi, err := os.Stat(t.KeyFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
		d.log.Warn(fmt.Sprintf("the TLS key file %s is accessible to other users (mode %v); it should be 0600", t.KeyFile, fi.Mode().Perm()))
	}
	o := server.TLSOptions{Certificate: cert, PQOnly: t.PQOnly}
	if t.ClientCAFile != "" {
		if o.ClientCAs, err = client.LoadRootCAs(t.ClientCAFile); err != nil {
			return nil, withHint(fmt.Errorf("tls.client_ca_file: %w", err), "tls.client_ca_file must name PEM CA certificates")
		}
	}
	cfg, err := server.ServerTLSConfig(o)
	if err != nil {
		return nil, err
	}
	creds := server.TransportCredentials(cfg, server.NewTLSMetrics(d.reg), d.log)
	return []grpc.ServerOption{grpc.Creds(creds)}, nil
}

// checkTCPListen refuses plaintext TCP beyond loopback: without tls: the
// port has neither encryption nor authentication.
func checkTCPListen(addr string, t *TLSConfig) error {
	if t.enabled() {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("listen.tcp %q: %w", addr, err)
		}
		return nil
	}
	if err := checkLoopback(addr); err != nil {
		return withHint(err, "set tls.cert_file and tls.key_file to serve TLS beyond loopback")
	}
	return nil
}

// devTLS gives the dev profile a TLS certificate unless the configuration
// names one: a self-signed ECDSA P-256 certificate for 127.0.0.1, ::1 and
// localhost in <data_dir>/tls/{cert,key}.pem, made on first start and
// again when it nears its end.
func devTLS(c *Config, now time.Time, logf func(string, ...any)) error {
	if c.TLS.enabled() {
		return nil
	}
	dir := filepath.Join(c.DataDir, devTLSDir)
	c.TLS.CertFile, c.TLS.KeyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if cert, err := tls.LoadX509KeyPair(c.TLS.CertFile, c.TLS.KeyFile); err == nil && cert.Leaf != nil &&
		now.Add(devCertRenew).Before(cert.Leaf.NotAfter) {
		return nil
	}
	logf("creating the development TLS certificate %s (self-signed, for 127.0.0.1, ::1 and localhost)", c.TLS.CertFile)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dev profile: %w", err)
	}
	certPEM, keyPEM, err := selfSignedCert(now)
	if err != nil {
		return fmt.Errorf("dev profile: TLS certificate: %w", err)
	}
	defer clear(keyPEM)
	// The key first: a certificate never names a key that is not there.
	if err := fsutil.WriteFileAtomic(c.TLS.KeyFile, keyPEM, 0o600); err != nil {
		return fmt.Errorf("dev profile: %w", err)
	}
	if err := fsutil.WriteFileAtomic(c.TLS.CertFile, certPEM, 0o644); err != nil {
		return fmt.Errorf("dev profile: %w", err)
	}
	return nil
}

// selfSignedCert makes a self-signed server certificate (not a CA) for the
// loopback names, valid from an hour before now for devCertLifetime.
func selfSignedCert(now time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "hsmd development"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(devCertLifetime),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, err
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	defer clear(pkcs8)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), nil
}

// tlsFlags are the client commands' TLS flags.
type tlsFlags struct {
	ca        string
	pqOnly    bool
	plaintext bool
}

// devCertPath is the certificate of `make run` (hsmd serve --dev --data-dir
// ./var), trusted by default for a loopback TCP address.
var devCertPath = filepath.Join(DefaultDataDir, devTLSDir, "cert.pem")

func (f *tlsFlags) register(fs *flag.FlagSet, env *cliEnv) {
	fs.StringVar(&f.ca, "tls-ca", env.getenv("HSMD_TLS_CA"), "PEM file of the CA (or self-signed certificate) hsmd's TLS certificate must chain to, for a TCP --addr (env HSMD_TLS_CA; default for a loopback address "+devCertPath+" if present, else the system roots)")
	fs.BoolVar(&f.pqOnly, "tls-pq-only", false, "refuse a TLS connection without a hybrid post-quantum key exchange")
	fs.BoolVar(&f.plaintext, "plaintext", false, "dial a TCP --addr without TLS (loopback only: an hsmd configured without tls)")
}

// options returns the client options for addr: TLS for a TCP address
// unless --plaintext, nothing for a unix socket.
func (f *tlsFlags) options(addr string) ([]client.Option, error) {
	if strings.HasPrefix(addr, "unix:") {
		return nil, nil
	}
	if f.plaintext {
		if f.ca != "" || f.pqOnly {
			return nil, &usageError{msg: "--plaintext excludes --tls-ca (HSMD_TLS_CA) and --tls-pq-only"}
		}
		return nil, nil
	}
	o := client.TLSOptions{PQOnly: f.pqOnly}
	ca := f.ca
	if ca == "" && checkLoopback(addr) == nil && exists(devCertPath) {
		ca = devCertPath
	}
	if ca != "" {
		pool, err := client.LoadRootCAs(ca)
		if err != nil {
			return nil, &usageError{msg: "--tls-ca: " + err.Error()}
		}
		o.RootCAs = pool
	}
	return []client.Option{client.WithTLS(o)}, nil
}

// unavailableHint is the hint for an unreachable hsmd: about TLS if the
// handshake failed, else whether hsmd runs.
func unavailableHint(msg string) string {
	if strings.Contains(msg, "handshake") || strings.Contains(msg, "tls:") || strings.Contains(msg, "x509:") {
		return "the TLS handshake failed: check --tls-ca (HSMD_TLS_CA) and --tls-pq-only; for an hsmd without tls use --plaintext"
	}
	return connectHint
}
