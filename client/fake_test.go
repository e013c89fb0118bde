package client

import (
	"context"
	"fmt"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fake implements just enough of the Envelope and Tenants services to test
// the client's dialing and mapping logic. It does no cryptography: a
// "ciphertext" is "ct:" + tenant + ":" + plaintext, and special
// ciphertexts trigger each item error.
type fake struct {
	hsmdv1.UnimplementedEnvelopeServer
	hsmdv1.UnimplementedTenantsServer

	mu          sync.Mutex
	lastContext map[string]string
	tenants     map[string]*hsmdv1.Tenant
	pageSize    int  // ListTenants page size, whatever the client asks
	loopToken   bool // ListTenants always answers with the same token
}

func (f *fake) Encrypt(_ context.Context, req *hsmdv1.EncryptRequest) (*hsmdv1.EncryptResponse, error) {
	switch req.GetTenant() {
	case "missing":
		return nil, status.Error(codes.NotFound, "tenant not found")
	case "short": // a broken server that drops an item
		return &hsmdv1.EncryptResponse{KeyVersion: 1}, nil
	}
	resp := &hsmdv1.EncryptResponse{KeyVersion: 3}
	for _, it := range req.GetItems() {
		f.mu.Lock()
		f.lastContext = maps.Clone(it.GetContext())
		f.mu.Unlock()
		resp.Ciphertexts = append(resp.Ciphertexts, []byte("ct:"+req.GetTenant()+":"+string(it.GetPlaintext())))
	}
	return resp, nil
}

func (f *fake) Decrypt(_ context.Context, req *hsmdv1.DecryptRequest) (*hsmdv1.DecryptResponse, error) {
	resp := &hsmdv1.DecryptResponse{}
	for _, it := range req.GetItems() {
		ct := string(it.GetCiphertext())
		if strings.HasPrefix(ct, TextPrefix) { // the server accepts the text form
			b, err := FromText(ct)
			if err != nil {
				return nil, status.Error(codes.Internal, "fake: bad text form")
			}
			ct = string(b)
		}
		var r *hsmdv1.DecryptResult
		switch {
		case ct == "tampered":
			r = itemFailure(codes.InvalidArgument, "DECRYPT_FAILED", "decryption failed")
		case ct == "garbage":
			r = itemFailure(codes.InvalidArgument, "MALFORMED", "not a ciphertext")
		case ct == "nokey":
			r = itemFailure(codes.Unavailable, "UNAVAILABLE", "key derivation unavailable")
		case ct == "okcode":
			r = itemFailure(codes.OK, "WEIRD", "")
		case strings.HasPrefix(ct, "ct:"):
			tenant, pt, _ := strings.Cut(strings.TrimPrefix(ct, "ct:"), ":")
			if req.GetTenant() != "" && req.GetTenant() != tenant {
				r = itemFailure(codes.InvalidArgument, "DECRYPT_FAILED", "decryption failed")
			} else {
				r = &hsmdv1.DecryptResult{Plaintext: []byte(pt)}
			}
		default:
			r = itemFailure(codes.InvalidArgument, "MALFORMED", "not a ciphertext")
		}
		resp.Results = append(resp.Results, r)
	}
	return resp, nil
}

func itemFailure(c codes.Code, reason, msg string) *hsmdv1.DecryptResult {
	return &hsmdv1.DecryptResult{Error: &hsmdv1.ItemError{Code: int32(c), Reason: reason, Message: msg}}
}

func (f *fake) CreateTenant(_ context.Context, req *hsmdv1.CreateTenantRequest) (*hsmdv1.Tenant, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.tenants == nil {
		f.tenants = map[string]*hsmdv1.Tenant{}
	}
	if _, ok := f.tenants[req.GetName()]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "tenant %q exists", req.GetName())
	}
	t := &hsmdv1.Tenant{
		Name: req.GetName(), Id: fmt.Sprintf("%016x", len(f.tenants)+1), CurrentVersion: 1, CreateTime: 1700000000,
		Versions: []*hsmdv1.KeyVersion{{Version: 1, KdkVersion: 1, State: "enabled", CreateTime: 1700000000}},
	}
	f.tenants[req.GetName()] = t
	return t, nil
}

func (f *fake) GetTenant(_ context.Context, req *hsmdv1.GetTenantRequest) (*hsmdv1.Tenant, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tenants[req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", req.GetName())
	}
	return t, nil
}

func (f *fake) ListTenants(_ context.Context, req *hsmdv1.ListTenantsRequest) (*hsmdv1.ListTenantsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.loopToken {
		return &hsmdv1.ListTenantsResponse{NextPageToken: "again"}, nil
	}
	names := slices.Sorted(maps.Keys(f.tenants))
	start := 0
	if req.GetPageToken() != "" {
		n, err := strconv.Atoi(req.GetPageToken())
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, "bad page token")
		}
		start = n
	}
	end := min(start+f.pageSize, len(names))
	resp := &hsmdv1.ListTenantsResponse{}
	for _, n := range names[start:end] {
		resp.Tenants = append(resp.Tenants, f.tenants[n])
	}
	if end < len(names) {
		resp.NextPageToken = strconv.Itoa(end)
	}
	return resp, nil
}

// startFake serves a fake on a unix socket in a temporary directory and
// returns it with the socket's absolute path.
func startFake(t *testing.T) (*fake, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	return serveFake(t, lis), sock
}

func serveFake(t *testing.T, lis net.Listener) *fake {
	t.Helper()
	f := &fake{pageSize: 2}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(DefaultMaxMsgSize), grpc.MaxSendMsgSize(DefaultMaxMsgSize))
	hsmdv1.RegisterEnvelopeServer(srv, f)
	hsmdv1.RegisterTenantsServer(srv, f)
	go srv.Serve(lis) //nolint:errcheck // Serve returns when Stop is called.
	t.Cleanup(srv.Stop)
	return f
}

// dialFake starts a fake and returns a client connected to it.
func dialFake(t *testing.T, opts ...Option) (*fake, *Client) {
	t.Helper()
	f, sock := startFake(t)
	c, err := Dial(t.Context(), "unix://"+sock, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return f, c
}
