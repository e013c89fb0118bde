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
	"google.golang.org/protobuf/proto"
)

// fake implements just enough of the Envelope, Tenants and Keys services
// to test the client's dialing and mapping logic. It does no cryptography:
// a "ciphertext" is "ct:" + tenant + ":" + plaintext, and special
// ciphertexts trigger each item error.
type fake struct {
	hsmdv1.UnimplementedEnvelopeServer
	hsmdv1.UnimplementedTenantsServer
	hsmdv1.UnimplementedKeysServer

	mu          sync.Mutex
	lastContext map[string]string
	tenants     map[string]*hsmdv1.Tenant
	pageSize    int  // ListTenants page size, whatever the client asks
	loopToken   bool // ListTenants always answers with the same token

	lastReq proto.Message // the last Keys, Rewrap or ShredTenant request
	key     *hsmdv1.Key   // every Keys method's answer
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
		case ct == "disabled":
			r = itemFailure(codes.FailedPrecondition, "KEY_DISABLED", "the key version is disabled")
		case ct == "destroyed":
			r = itemFailure(codes.FailedPrecondition, "KEY_DESTROYED", "the key version is destroyed")
		case ct == "retired":
			r = itemFailure(codes.FailedPrecondition, "KEY_VERSION_RETIRED", "the key version is below the tenant's min_decryption_version")
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

// Rewrap decrypts as Decrypt does and "seals" under version 4.
func (f *fake) Rewrap(ctx context.Context, req *hsmdv1.RewrapRequest) (*hsmdv1.RewrapResponse, error) {
	f.record(req)
	dec, err := f.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: req.GetTenant(), Items: req.GetItems()})
	if err != nil {
		return nil, err
	}
	resp := &hsmdv1.RewrapResponse{KeyVersion: 4}
	for i, r := range dec.GetResults() {
		switch {
		case r.GetError() != nil:
			resp.Results = append(resp.Results, &hsmdv1.RewrapResult{Error: r.GetError()})
		case req.GetTenant() == "short" && i == 0: // a broken server that drops an item
		case req.GetTenant() == "empty": // a broken server that loses a ciphertext
			resp.Results = append(resp.Results, &hsmdv1.RewrapResult{})
		default:
			ct := "ct:" + req.GetTenant() + ":" + string(r.GetPlaintext())
			resp.Results = append(resp.Results, &hsmdv1.RewrapResult{Ciphertext: []byte(ct)})
		}
	}
	return resp, nil
}

func (f *fake) record(req proto.Message) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastReq = proto.Clone(req)
}

// lastRequest returns the last Keys, Rewrap or ShredTenant request.
func (f *fake) lastRequest() proto.Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastReq
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

func (f *fake) ShredTenant(_ context.Context, req *hsmdv1.ShredTenantRequest) (*hsmdv1.ShredTenantResponse, error) {
	f.record(req)
	f.mu.Lock()
	defer f.mu.Unlock()
	if req.GetConfirm() != req.GetName() {
		return nil, status.Error(codes.InvalidArgument, "confirm must repeat the tenant name")
	}
	if _, ok := f.tenants[req.GetName()]; !ok {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", req.GetName())
	}
	delete(f.tenants, req.GetName())
	return &hsmdv1.ShredTenantResponse{}, nil
}

// keyAnswer records a Keys request and returns f.key, or NotFound for the
// tenant "missing".
func (f *fake) keyAnswer(req proto.Message, tenant string) (*hsmdv1.Key, error) {
	f.record(req)
	if tenant == "missing" {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", tenant)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.key, nil
}

func (f *fake) RotateKey(_ context.Context, req *hsmdv1.RotateKeyRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
}

func (f *fake) GetKey(_ context.Context, req *hsmdv1.GetKeyRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
}

func (f *fake) SetKeyPolicy(_ context.Context, req *hsmdv1.SetKeyPolicyRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
}

func (f *fake) DisableVersion(_ context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
}

func (f *fake) EnableVersion(_ context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
}

func (f *fake) ScheduleDestroy(_ context.Context, req *hsmdv1.ScheduleDestroyRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
}

func (f *fake) CancelDestroy(_ context.Context, req *hsmdv1.VersionRequest) (*hsmdv1.Key, error) {
	return f.keyAnswer(req, req.GetTenant())
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
	hsmdv1.RegisterKeysServer(srv, f)
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
