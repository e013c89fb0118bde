package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// cliFake is a stand-in hsmd for the client commands' tests: no
// cryptography, just enough to check flags, streams and error mapping. A
// "ciphertext" is "ct|tenant|k=v,...|plaintext".
type cliFake struct {
	hsmdv1.UnimplementedEnvelopeServer
	hsmdv1.UnimplementedTenantsServer

	mu      sync.Mutex
	tenants map[string]*hsmdv1.Tenant
}

func fakeContextKey(m map[string]string) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, k+"="+m[k])
	}
	return strings.Join(parts, ",")
}

func (f *cliFake) Encrypt(_ context.Context, req *hsmdv1.EncryptRequest) (*hsmdv1.EncryptResponse, error) {
	if _, err := f.GetTenant(context.Background(), &hsmdv1.GetTenantRequest{Name: req.GetTenant()}); err != nil {
		return nil, err
	}
	resp := &hsmdv1.EncryptResponse{KeyVersion: 1}
	for _, it := range req.GetItems() {
		ct := "ct|" + req.GetTenant() + "|" + fakeContextKey(it.GetContext()) + "|" + string(it.GetPlaintext())
		resp.Ciphertexts = append(resp.Ciphertexts, []byte(ct))
	}
	return resp, nil
}

func (f *cliFake) Decrypt(_ context.Context, req *hsmdv1.DecryptRequest) (*hsmdv1.DecryptResponse, error) {
	resp := &hsmdv1.DecryptResponse{}
	for _, it := range req.GetItems() {
		parts := strings.SplitN(string(it.GetCiphertext()), "|", 4)
		switch {
		case len(parts) != 4 || parts[0] != "ct":
			resp.Results = append(resp.Results, &hsmdv1.DecryptResult{Error: &hsmdv1.ItemError{
				Code: int32(codes.InvalidArgument), Reason: "MALFORMED", Message: "not a ciphertext"}})
		case (req.GetTenant() != "" && parts[1] != req.GetTenant()) || parts[2] != fakeContextKey(it.GetContext()):
			resp.Results = append(resp.Results, &hsmdv1.DecryptResult{Error: &hsmdv1.ItemError{
				Code: int32(codes.InvalidArgument), Reason: "DECRYPT_FAILED", Message: "decryption failed: detail the CLI must not print"}})
		default:
			resp.Results = append(resp.Results, &hsmdv1.DecryptResult{Plaintext: []byte(parts[3])})
		}
	}
	return resp, nil
}

func (f *cliFake) CreateTenant(_ context.Context, req *hsmdv1.CreateTenantRequest) (*hsmdv1.Tenant, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.tenants[req.GetName()]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "tenant %q already exists", req.GetName())
	}
	t := &hsmdv1.Tenant{Name: req.GetName(), Id: fmt.Sprintf("%08x", len(f.tenants)+1), CurrentVersion: 1,
		CreateTime: 1700000000, Versions: []*hsmdv1.KeyVersion{{Version: 1, KdkVersion: 1, State: "enabled", CreateTime: 1700000000}}}
	f.tenants[req.GetName()] = t
	return t, nil
}

func (f *cliFake) GetTenant(_ context.Context, req *hsmdv1.GetTenantRequest) (*hsmdv1.Tenant, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tenants[req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "tenant %q not found", req.GetName())
	}
	return t, nil
}

func (f *cliFake) ListTenants(context.Context, *hsmdv1.ListTenantsRequest) (*hsmdv1.ListTenantsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &hsmdv1.ListTenantsResponse{}
	for _, n := range slices.Sorted(maps.Keys(f.tenants)) {
		resp.Tenants = append(resp.Tenants, f.tenants[n])
	}
	return resp, nil
}

// startCLIFake serves a cliFake on a unix socket and returns its address.
func startCLIFake(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(cliMsgSize), grpc.MaxSendMsgSize(cliMsgSize))
	f := &cliFake{tenants: map[string]*hsmdv1.Tenant{}}
	hsmdv1.RegisterEnvelopeServer(srv, f)
	hsmdv1.RegisterTenantsServer(srv, f)
	go srv.Serve(lis) //nolint:errcheck // returns at Stop
	t.Cleanup(srv.Stop)
	return "unix://" + sock
}

type cliResult struct {
	code           int
	stdout, stderr string
}

// runCLI runs one hsmd invocation in process with HSMD_ADDR set to addr.
func runCLI(t *testing.T, addr string, stdin io.Reader, args ...string) cliResult {
	t.Helper()
	var out, errb bytes.Buffer
	if stdin == nil {
		stdin = strings.NewReader("")
	}
	env := &cliEnv{stdin: stdin, stdout: &out, stderr: &errb, getenv: func(k string) string {
		if k == "HSMD_ADDR" {
			return addr
		}
		return ""
	}}
	code := run(t.Context(), env, args)
	return cliResult{code, out.String(), errb.String()}
}

func TestTenantsCommands(t *testing.T) {
	addr := startCLIFake(t)
	for _, n := range []string{"payments", "billing"} {
		r := runCLI(t, addr, nil, "tenants", "create", n)
		if r.code != 0 || !strings.HasPrefix(r.stdout, n+"  ") {
			t.Fatalf("tenants create %s = %+v", n, r)
		}
	}
	r := runCLI(t, addr, nil, "tenants", "list")
	want := "billing   00000002  1\npayments  00000001  1\n"
	if r.code != 0 || r.stdout != want {
		t.Errorf("tenants list = %+v, want stdout %q", r, want)
	}
	r = runCLI(t, addr, nil, "tenants", "get", "payments")
	if r.code != 0 || !strings.Contains(r.stdout, "id:               00000001\n") ||
		!strings.Contains(r.stdout, "  1  kdk 1  enabled  2023-11-14T22:13:20Z\n") {
		t.Errorf("tenants get = %+v", r)
	}
	r = runCLI(t, addr, nil, "tenants", "get", "nobody")
	if r.code != 1 || r.stderr != "hsmd: error: get tenant: tenant \"nobody\" not found (NotFound)\n" {
		t.Errorf("tenants get unknown = %+v", r)
	}
	r = runCLI(t, addr, nil, "tenants", "create", "billing")
	if r.code != 1 || !strings.Contains(r.stderr, "AlreadyExists") {
		t.Errorf("tenants create duplicate = %+v", r)
	}
	// Flags after the name, and an explicit --addr overriding HSMD_ADDR.
	r = runCLI(t, "unix:///nonexistent/x.sock", nil, "tenants", "get", "billing", "--addr", addr)
	if r.code != 0 || !strings.Contains(r.stdout, "billing") {
		t.Errorf("tenants get NAME --addr = %+v", r)
	}
}

func TestTenantsUsage(t *testing.T) {
	addr := startCLIFake(t)
	for _, args := range [][]string{
		{"tenants"},
		{"tenants", "frobnicate"},
		{"tenants", "create"},
		{"tenants", "create", "a", "b"},
		{"tenants", "list", "extra"},
		{"tenants", "get", "--nope", "x"},
	} {
		if r := runCLI(t, addr, nil, args...); r.code != 2 || !strings.HasPrefix(r.stderr, "hsmd: error: ") {
			t.Errorf("%q = %+v, want exit 2", args, r)
		}
	}
	if r := runCLI(t, addr, nil, "tenants", "list", "-h"); r.code != 0 || !strings.Contains(r.stderr, "-addr") {
		t.Errorf("tenants list -h = %+v", r)
	}
}

func TestEncryptDecryptCommands(t *testing.T) {
	addr := startCLIFake(t)
	runCLI(t, addr, nil, "tenants", "create", "t1")
	pt := "secret\x00bytes \n"

	r := runCLI(t, addr, strings.NewReader(pt), "encrypt", "--tenant", "t1", "--context", "b=2", "--context", "a=1")
	if r.code != 0 || r.stdout != "ct|t1|a=1,b=2|"+pt {
		t.Fatalf("encrypt = %+v", r)
	}
	bin := r.stdout
	r = runCLI(t, addr, strings.NewReader(bin), "decrypt", "--context", "a=1", "--context", "b=2")
	if r.code != 0 || r.stdout != pt {
		t.Errorf("decrypt binary = %+v", r)
	}

	r = runCLI(t, addr, strings.NewReader(pt), "encrypt", "--tenant=t1", "--text")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "hsmd:v1:") || !strings.HasSuffix(r.stdout, "\n") || strings.Count(r.stdout, "\n") != 1 {
		t.Fatalf("encrypt --text = %+v", r)
	}
	r = runCLI(t, addr, strings.NewReader("  \n"+r.stdout+"\n\n"), "decrypt", "--tenant", "t1")
	if r.code != 0 || r.stdout != pt {
		t.Errorf("decrypt text = %+v", r)
	}

	// Authentication failures print exactly one line, whatever the cause.
	for _, args := range [][]string{
		{"decrypt", "--context", "a=1"},                                       // missing b=2
		{"decrypt", "--context", "a=9", "--context", "b=2"},                   // wrong value
		{"decrypt", "--tenant", "t2", "--context", "a=1", "--context", "b=2"}, // wrong tenant
	} {
		r = runCLI(t, addr, strings.NewReader(bin), args...)
		if r.code != 1 || r.stderr != "hsmd: error: decryption failed\n" || r.stdout != "" {
			t.Errorf("%q = %+v, want exactly decryption failed", args, r)
		}
	}

	r = runCLI(t, addr, strings.NewReader("not a ciphertext"), "decrypt")
	if r.code != 1 || r.stderr != "hsmd: error: input is not an hsmd ciphertext\n" {
		t.Errorf("decrypt garbage = %+v", r)
	}
	r = runCLI(t, addr, strings.NewReader("hsmd:v1:!!!"), "decrypt")
	if r.code != 1 || !strings.Contains(r.stderr, "not a valid hsmd text-form ciphertext") {
		t.Errorf("decrypt bad text = %+v", r)
	}
	r = runCLI(t, addr, strings.NewReader(" \n"), "decrypt")
	if r.code != 1 || !strings.Contains(r.stderr, "no ciphertext") {
		t.Errorf("decrypt empty = %+v", r)
	}
	r = runCLI(t, addr, strings.NewReader("x"), "encrypt", "--tenant", "nobody")
	if r.code != 1 || !strings.Contains(r.stderr, "NotFound") {
		t.Errorf("encrypt unknown tenant = %+v", r)
	}
}

func TestEncryptDecryptUsage(t *testing.T) {
	addr := startCLIFake(t)
	for _, args := range [][]string{
		{"encrypt"}, // no tenant
		{"encrypt", "--tenant", "t1", "file.txt"}, // positional
		{"encrypt", "--tenant", "t1", "--context", "novalue"},
		{"encrypt", "--tenant", "t1", "--context", "=v"},
		{"encrypt", "--tenant", "t1", "--context", "k=1", "--context", "k=2"},
		{"decrypt", "file.txt"},
		{"decrypt", "--addr", "10.0.0.1:443", "--plaintext"}, // plaintext beyond loopback
		{"encrypt", "--tenant", "t1", "--addr", "ftp://x"},
	} {
		if r := runCLI(t, addr, strings.NewReader("x"), args...); r.code != 2 {
			t.Errorf("%q = %+v, want exit 2", args, r)
		}
	}
}

func TestUnreachableHint(t *testing.T) {
	addr := "unix://" + filepath.Join(t.TempDir(), "nobody.sock")
	r := runCLI(t, addr, strings.NewReader("x"), "encrypt", "--tenant", "t1")
	if r.code != 1 || !strings.HasSuffix(r.stderr, "hsmd: hint: is hsmd running? start it with make run\n") {
		t.Errorf("encrypt with no server = %+v", r)
	}
	r = runCLI(t, addr, nil, "tenants", "list")
	if r.code != 1 || !strings.Contains(r.stderr, "hsmd: hint: is hsmd running?") {
		t.Errorf("tenants list with no server = %+v", r)
	}
}

// endlessZeros is an endless stream of zeros that counts what is read.
type endlessZeros struct{ n int64 }

func (c *endlessZeros) Read(p []byte) (int, error) {
	clear(p)
	c.n += int64(len(p))
	return len(p), nil
}

func TestInputCap(t *testing.T) {
	addr := startCLIFake(t)
	for _, cmd := range []string{"encrypt", "decrypt"} {
		cr := &endlessZeros{}
		r := runCLI(t, addr, cr, cmd, "--tenant", "t1")
		if r.code != 1 || !strings.Contains(r.stderr, "64 MiB limit") {
			t.Errorf("%s of endless input = %+v", cmd, r)
		}
		if cr.n > maxCLIInput+1 {
			t.Errorf("%s read %d bytes, more than the cap + 1", cmd, cr.n)
		}
	}
}

func TestDefaultAddr(t *testing.T) {
	env := &cliEnv{stderr: io.Discard, getenv: func(string) string { return "" }}
	_, cf := newClientFlagSet(env, "x", "x")
	if cf.addr != "unix://./var/hsmd.sock" {
		t.Errorf("default --addr = %q", cf.addr)
	}
	env.getenv = func(k string) string {
		if k == "HSMD_ADDR" {
			return "127.0.0.1:7443"
		}
		return ""
	}
	_, cf = newClientFlagSet(env, "x", "x")
	if cf.addr != "127.0.0.1:7443" {
		t.Errorf("--addr from HSMD_ADDR = %q", cf.addr)
	}
}

func TestContextFlag(t *testing.T) {
	c := contextFlag{}
	for _, s := range []string{"table=users", "empty=", "eq=a=b"} {
		if err := c.Set(s); err != nil {
			t.Errorf("Set(%q): %v", s, err)
		}
	}
	if got := c.String(); got != "empty=,eq=a=b,table=users" {
		t.Errorf("String() = %q", got)
	}
	for _, s := range []string{"", "novalue", "=v", "table=other"} {
		if err := c.Set(s); err == nil {
			t.Errorf("Set(%q) succeeded", s)
		} else if strings.Contains(err.Error(), "other") {
			t.Errorf("Set(%q) error %q quotes the value", s, err)
		}
	}
}

func TestParseClientFlags(t *testing.T) {
	tests := []struct {
		args []string
		pos  []string
		v    bool
	}{
		{nil, nil, false},
		{[]string{"a"}, []string{"a"}, false},
		{[]string{"-v", "a"}, []string{"a"}, true},
		{[]string{"a", "-v"}, []string{"a"}, true},
		{[]string{"a", "-v", "b"}, []string{"a", "b"}, true},
		{[]string{"a", "--", "-v"}, []string{"a", "-v"}, false},
		{[]string{"--", "-v", "a"}, []string{"-v", "a"}, false},
	}
	for _, tt := range tests {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		v := fs.Bool("v", false, "")
		pos, err := parseClientFlags(fs, tt.args)
		if err != nil || !slices.Equal(pos, tt.pos) || *v != tt.v {
			t.Errorf("parseClientFlags(%q) = %q, v=%v, %v; want %q, v=%v", tt.args, pos, *v, err, tt.pos, tt.v)
		}
	}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var u *usageError
	if _, err := parseClientFlags(fs, []string{"-nope"}); !errors.As(err, &u) {
		t.Errorf("unknown flag: %v, want a usageError", err)
	}
}
