package main

import (
	"context"
	"encoding/base64"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/envelope"
)

type publicKeyFake struct {
	hsmdv1.UnimplementedKeysServer
	key []byte
}

func (f *publicKeyFake) GetPublicKey(_ context.Context, req *hsmdv1.GetPublicKeyRequest) (*hsmdv1.PublicKey, error) {
	if req.Tenant != "payments" {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", req.Tenant)
	}
	return &hsmdv1.PublicKey{Tenant: "payments", TenantId: 42, KeyVersion: 3, Algorithm: "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM", PublicKey: f.key}, nil
}

func TestKeysPublic(t *testing.T) {
	kem, _, _ := envelope.XWingSuite()
	priv, err := kem.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hsmdv1.RegisterKeysServer(srv, &publicKeyFake{key: priv.PublicKey().Bytes()})
	go srv.Serve(lis) //nolint:errcheck // returns at Stop
	t.Cleanup(srv.Stop)
	r := runCLI(t, "unix://"+sock, nil, "keys", "public", "payments")
	want := "tenant:       payments\ntenant id:    42\nkey version:  3\nalgorithm:    MLKEM768-X25519/HKDF-SHA256/AES-256-GCM\npublic key:   " +
		base64.RawURLEncoding.EncodeToString(priv.PublicKey().Bytes()) + "\n"
	if r.code != 0 || r.stdout != want || r.stderr != "" {
		t.Errorf("keys public = %+v, want stdout\n%s", r, want)
	}
	r = runCLI(t, "unix://"+sock, nil, "keys", "public", "nobody")
	if r.code != 1 || !strings.HasPrefix(r.stderr, "hsmd: error: get public key: ") {
		t.Errorf("keys public unknown = %+v", r)
	}
}
