package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"google.golang.org/grpc"

	"github.com/hsmd/hsmd/store"
)

// KMSConfig serves the Kubernetes KMS v2 plugin API (kube-apiserver's
// EncryptionConfiguration, provider kms apiVersion v2) on a unix socket of
// its own, sealing the API server's data keys under one tenant's key.
// Not served if Socket is empty. See docs/KUBERNETES.md.
type KMSConfig struct {
	Socket string `yaml:"socket"` // unix socket path, created mode 0600
	Tenant string `yaml:"tenant"` // the tenant whose current key version seals
}

// validate names the YAML path of the first problem.
func (k *KMSConfig) validate() error {
	switch {
	case k.Socket == "" && k.Tenant == "":
		return nil
	case k.Socket == "":
		return errors.New("kms.socket is required with kms.tenant (--kms-socket)")
	case k.Tenant == "":
		return errors.New("kms.tenant is required with kms.socket (--kms-tenant)")
	}
	if err := store.ValidateName(k.Tenant); err != nil {
		return fmt.Errorf("kms.tenant: %w", err)
	}
	return nil
}

// serveKMS serves the KMS v2 plugin, if configured, on its own gRPC server
// built with the same options as the main one (request IDs, metrics,
// audit), so the API server reaches the KMS service and nothing else. A
// stale socket is replaced as listen.unix's is. Serve's error goes to
// errc. The returned stop ends it gracefully (at most 10 s).
func (d *daemon) serveKMS(ctx context.Context, errc chan<- error) (stop func(), err error) {
	k := d.cfg.KMS
	if err := k.validate(); err != nil || k.Socket == "" {
		return func() {}, err
	}
	g := grpc.NewServer(d.srv.ServerOptions()...)
	if err := d.srv.RegisterKMSv2(g, k.Tenant); err != nil {
		return nil, err
	}
	l, err := listenUnix(k.Socket)
	if err != nil {
		return nil, fmt.Errorf("kms.socket: %w", err)
	}
	if _, err := d.meta.GetTenant(ctx, k.Tenant); err != nil {
		d.log.Warn(fmt.Sprintf("kms.tenant %q: %v; the KMS plugin answers NOT_FOUND until it exists (hsmd tenants create %s)", k.Tenant, err, k.Tenant))
	}
	go func() { errc <- g.Serve(l) }()
	return func() {
		stopped := make(chan struct{})
		go func() { g.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			g.Stop()
		}
	}, nil
}

// kmsAnnounce is the line announce prints for the KMS plugin, or "".
func (c *Config) kmsAnnounce() string {
	if c.KMS.Socket == "" {
		return ""
	}
	abs, _ := filepath.Abs(c.KMS.Socket)
	return fmt.Sprintf("  kms      unix://%s (Kubernetes KMS v2, tenant %s)\n", abs, c.KMS.Tenant)
}
