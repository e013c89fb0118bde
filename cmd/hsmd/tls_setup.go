package main

// TLS of the gRPC TCP listener: the tls: configuration section, the
// server credentials, and the client commands' TLS flags. (The dev
// profile's certificates are in devpki.go.)

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/grpc"

	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/server"
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

// tlsFlags are the client commands' TLS flags.
type tlsFlags struct {
	ca        string
	cert, key string
	pqOnly    bool
	plaintext bool
}

// devPKIDefault are the files of `make run` (hsmd serve --dev --data-dir
// ./var): its CA is trusted, and its client certificate presented, by
// default for a loopback TCP address.
var devPKIDefault = devPKIAt(filepath.Join(DefaultDataDir, devTLSDir))

func (f *tlsFlags) register(fs *flag.FlagSet, env *cliEnv) {
	fs.StringVar(&f.ca, "tls-ca", env.getenv("HSMD_TLS_CA"), "PEM file of the CA hsmd's TLS certificate must chain to, for a TCP --addr (env HSMD_TLS_CA; default for a loopback address "+devPKIDefault.ca+" if present, else the system roots)")
	fs.StringVar(&f.cert, "tls-cert", env.getenv("HSMD_TLS_CERT"), "PEM client certificate (chain) to present for mutual TLS (env HSMD_TLS_CERT; default for a loopback address "+devPKIDefault.clientCert+" if present)")
	fs.StringVar(&f.key, "tls-key", env.getenv("HSMD_TLS_KEY"), "PEM private key of --tls-cert (env HSMD_TLS_KEY; default "+devPKIDefault.clientKey+" with the default certificate)")
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
		if f.ca != "" || f.cert != "" || f.key != "" || f.pqOnly {
			return nil, &usageError{msg: "--plaintext excludes --tls-ca, --tls-cert, --tls-key (HSMD_TLS_*) and --tls-pq-only"}
		}
		return nil, nil
	}
	if (f.cert == "") != (f.key == "") {
		return nil, &usageError{msg: "--tls-cert and --tls-key (HSMD_TLS_CERT, HSMD_TLS_KEY) go together"}
	}
	o := client.TLSOptions{PQOnly: f.pqOnly}
	ca, cert, key := f.ca, f.cert, f.key
	if checkLoopback(addr) == nil {
		if ca == "" && exists(devPKIDefault.ca) {
			ca = devPKIDefault.ca
		}
		if cert == "" && exists(devPKIDefault.clientCert) && exists(devPKIDefault.clientKey) {
			cert, key = devPKIDefault.clientCert, devPKIDefault.clientKey
		}
	}
	if ca != "" {
		pool, err := client.LoadRootCAs(ca)
		if err != nil {
			return nil, &usageError{msg: "--tls-ca: " + err.Error()}
		}
		o.RootCAs = pool
	}
	if cert != "" {
		c, err := client.LoadClientCertificate(cert, key)
		if err != nil {
			return nil, &usageError{msg: "--tls-cert: " + err.Error()}
		}
		o.Certificate = c
	}
	return []client.Option{client.WithTLS(o)}, nil
}

// unavailableHint is the hint for an unreachable hsmd: about TLS if the
// handshake failed, else whether hsmd runs.
func unavailableHint(msg string) string {
	if strings.Contains(msg, "handshake") || strings.Contains(msg, "tls:") || strings.Contains(msg, "x509:") {
		return "the TLS handshake failed: check --tls-ca (HSMD_TLS_CA), the client certificate (--tls-cert, --tls-key) and --tls-pq-only; for an hsmd without tls use --plaintext"
	}
	return connectHint
}
