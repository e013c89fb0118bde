package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// TestKMSConfig: the kms section parses strictly and validates, naming
// its YAML path.
func TestKMSConfig(t *testing.T) {
	p := filepath.Join(t.TempDir(), "hsmd.yaml")
	if err := os.WriteFile(p, []byte("kms:\n  socket: /run/hsmd/kms.sock\n  tenant: k8s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := loadConfig(p)
	if err != nil || c.KMS != (KMSConfig{Socket: "/run/hsmd/kms.sock", Tenant: "k8s"}) {
		t.Fatalf("%+v %v", c, err)
	}
	for _, tc := range []struct {
		k    KMSConfig
		want string // "" = valid
	}{
		{KMSConfig{}, ""},
		{KMSConfig{Socket: "s", Tenant: "k8s"}, ""},
		{KMSConfig{Socket: "s"}, "kms.tenant is required"},
		{KMSConfig{Tenant: "k8s"}, "kms.socket is required"},
		{KMSConfig{Socket: "s", Tenant: "bad name"}, "kms.tenant: "},
	} {
		err := tc.k.validate()
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.k, err, tc.want)
		}
	}
}

// TestServeKMSPlugin: `hsmd serve --kms-socket --kms-tenant` replaces a
// stale socket file, serves the KMS v2 API on it (mode 0600), and answers
// NOT_FOUND until the tenant exists, then Status, Encrypt and Decrypt.
func TestServeKMSPlugin(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "kms.sock")
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	cmd := serveCmd(t, dir)
	cmd.Args = append(cmd.Args, "--kms-socket", sock, "--kms-tenant", "k8s")
	d := startDaemon(t, cmd)
	if !strings.Contains(d.out.String(), "kms      unix://"+sock+" (Kubernetes KMS v2, tenant k8s)") {
		t.Fatalf("no kms line in\n%s", d.out)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("kms socket: %v %v", fi, err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := kmsapi.NewKeyManagementServiceClient(conn)
	ctx := context.Background()
	if _, err := c.Status(ctx, &kmsapi.StatusRequest{}); err == nil || !strings.Contains(err.Error(), "NotFound") {
		t.Fatalf("status before the tenant exists: %v", err)
	}
	mustCLI(t, dir, "", "tenants", "create", "k8s")
	st, err := c.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil || st.Healthz != "ok" || st.KeyId != "hsmd:k8s:v1" || st.Version != "v2" {
		t.Fatalf("status %+v %v", st, err)
	}
	dek := bytes.Repeat([]byte{9}, 32)
	enc, err := c.Encrypt(ctx, &kmsapi.EncryptRequest{Uid: "u1", Plaintext: dek})
	if err != nil {
		t.Fatal(err)
	}
	dec, err := c.Decrypt(ctx, &kmsapi.DecryptRequest{Uid: "u2", Ciphertext: enc.Ciphertext, KeyId: enc.KeyId})
	if err != nil || !bytes.Equal(dec.Plaintext, dek) {
		t.Fatalf("decrypt %x %v", dec.GetPlaintext(), err)
	}
	// The main socket does not serve the KMS API, nor the KMS socket hsmd's.
	if _, err := kmsapi.NewKeyManagementServiceClient(dialUnix(t, filepath.Join(dir, "var", "hsmd.sock"))).Status(ctx, &kmsapi.StatusRequest{}); err == nil ||
		!strings.Contains(err.Error(), "Unimplemented") {
		t.Fatalf("KMS on the main socket: %v", err)
	}
	d.stop(t)
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("the kms socket outlives hsmd: %v", err)
	}
}

func dialUnix(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	c, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
