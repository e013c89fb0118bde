package main

// The dev profile's TLS: a local CA, the server's certificate and a client
// certificate for the CLI, so that `make run` serves mutual TLS on its TCP
// port with no setup.

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/hsmd/hsmd/internal/fsutil"
)

const (
	// devTLSDir holds the dev profile's certificates, under the data dir.
	devTLSDir = "tls"
	// devCertLifetime is the dev certificates' validity; they are made
	// anew once less than devCertRenew of it is left.
	devCertLifetime = 365 * 24 * time.Hour
	devCertRenew    = 7 * 24 * time.Hour
	// devClientID is the identity of the dev client certificate (its URI
	// SAN): what an authz policy names to allow the CLI of `make run`.
	devClientID = "spiffe://hsmd.localhost/cli"
)

// devPKI are the dev profile's files under <data_dir>/tls.
type devPKI struct {
	ca, cert, key, clientCert, clientKey string
}

func devPKIAt(dir string) devPKI {
	return devPKI{
		ca:         filepath.Join(dir, "ca.pem"),
		cert:       filepath.Join(dir, "cert.pem"),
		key:        filepath.Join(dir, "key.pem"),
		clientCert: filepath.Join(dir, "client.pem"),
		clientKey:  filepath.Join(dir, "client-key.pem"),
	}
}

// devTLS gives the dev profile mutual TLS unless the configuration names a
// certificate: a local CA ("hsmd development CA", ECDSA P-256) issues a
// server certificate for 127.0.0.1, ::1 and localhost and a client
// certificate for devClientID; the server requires client certificates
// from that CA. The CA's private key is discarded once both are issued, so
// nothing else can be issued under it. All are made on first start, and
// made again together when a file is missing or altered, or a certificate
// nears its end.
func devTLS(c *Config, now time.Time, logf func(string, ...any)) error {
	if c.TLS.enabled() {
		return nil
	}
	dir := filepath.Join(c.DataDir, devTLSDir)
	p := devPKIAt(dir)
	c.TLS.CertFile, c.TLS.KeyFile = p.cert, p.key
	if c.TLS.ClientCAFile == "" {
		c.TLS.ClientCAFile = p.ca
	}
	if p.valid(now) {
		return nil
	}
	logf("creating the development CA and TLS certificates in %s (server: 127.0.0.1, ::1, localhost; client: %s)", dir, devClientID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dev profile: %w", err)
	}
	if err := p.issue(now); err != nil {
		return fmt.Errorf("dev profile: TLS certificates: %w", err)
	}
	return nil
}

// valid reports whether every file of p is there, both certificates chain
// to the CA for their purpose, and neither nears its end.
func (p devPKI) valid(now time.Time) bool {
	b, err := os.ReadFile(p.ca)
	if err != nil {
		return false
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b) {
		return false
	}
	for _, pair := range []struct {
		cert, key string
		usage     x509.ExtKeyUsage
	}{{p.cert, p.key, x509.ExtKeyUsageServerAuth}, {p.clientCert, p.clientKey, x509.ExtKeyUsageClientAuth}} {
		c, err := tls.LoadX509KeyPair(pair.cert, pair.key)
		if err != nil || c.Leaf == nil || !now.Add(devCertRenew).Before(c.Leaf.NotAfter) {
			return false
		}
		if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{pair.usage}}); err != nil {
			return false
		}
	}
	return true
}

// issue makes a new CA and both certificates, writing each key before the
// certificate that names it and the CA last: a start interrupted halfway
// leaves files that valid refuses, and the next start issues them again.
func (p devPKI) issue(now time.Time) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTmpl := devTemplate(now, pkix.Name{CommonName: "hsmd development CA"})
	caTmpl.IsCA, caTmpl.KeyUsage = true, x509.KeyUsageCertSign
	caTmpl.MaxPathLenZero = true
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	server := devTemplate(now, pkix.Name{CommonName: "hsmd development server"})
	server.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	server.DNSNames = []string{"localhost"}
	server.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	id, err := url.Parse(devClientID)
	if err != nil {
		return err
	}
	cli := devTemplate(now, pkix.Name{CommonName: "hsmd development client"})
	cli.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	cli.URIs = []*url.URL{id}
	for _, leaf := range []struct {
		tmpl      *x509.Certificate
		cert, key string
	}{{server, p.cert, p.key}, {cli, p.clientCert, p.clientKey}} {
		certPEM, keyPEM, err := issueLeaf(leaf.tmpl, ca, caKey)
		if err != nil {
			return err
		}
		err = fsutil.WriteFileAtomic(leaf.key, keyPEM, 0o600)
		clear(keyPEM)
		if err != nil {
			return err
		}
		if err := fsutil.WriteFileAtomic(leaf.cert, certPEM, 0o644); err != nil {
			return err
		}
	}
	return fsutil.WriteFileAtomic(p.ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644)
}

// devTemplate is a certificate template valid from an hour before now for
// devCertLifetime, with a random 127-bit serial.
func devTemplate(now time.Time, subject pkix.Name) *x509.Certificate {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(devCertLifetime),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
}

// issueLeaf makes a P-256 key and a certificate for tmpl signed by the CA.
func issueLeaf(tmpl, ca *x509.Certificate, caKey crypto.Signer) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
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
