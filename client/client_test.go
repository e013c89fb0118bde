package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"maps"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

func TestParseAddr(t *testing.T) {
	tests := []struct {
		in       string
		network  string
		address  string
		loopback bool
	}{
		{"unix:///run/hsmd/hsmd.sock", "unix", "/run/hsmd/hsmd.sock", false},
		{"unix:var/hsmd.sock", "unix", "var/hsmd.sock", false},
		{"unix:/abs/hsmd.sock", "unix", "/abs/hsmd.sock", false},
		{"unix://./var/hsmd.sock", "unix", "./var/hsmd.sock", false},
		{"unix://../hsmd.sock", "unix", "../hsmd.sock", false},
		{"unix:///tmp/odd name?#%.sock", "unix", "/tmp/odd name?#%.sock", false},
		{"127.0.0.1:7443", "tcp", "127.0.0.1:7443", true},
		{"127.8.9.10:7443", "tcp", "127.8.9.10:7443", true},
		{"localhost:7443", "tcp", "localhost:7443", true},
		{"LocalHost:7443", "tcp", "LocalHost:7443", true},
		{"[::1]:7443", "tcp", "[::1]:7443", true},
		{"[::ffff:127.0.0.1]:7443", "tcp", "[::ffff:127.0.0.1]:7443", true},
		{"10.0.0.1:443", "tcp", "10.0.0.1:443", false},
		{"hsmd.internal:443", "tcp", "hsmd.internal:443", false},
		{"localhost.evil.example:443", "tcp", "localhost.evil.example:443", false},
	}
	for _, tt := range tests {
		a, err := parseAddr(tt.in)
		if err != nil {
			t.Errorf("parseAddr(%q): %v", tt.in, err)
			continue
		}
		if a.network != tt.network || a.address != tt.address || a.loopback != tt.loopback {
			t.Errorf("parseAddr(%q) = %+v, want {%s %s %v}", tt.in, a, tt.network, tt.address, tt.loopback)
		}
	}
}

func TestParseAddrBad(t *testing.T) {
	for _, in := range []string{
		"", "unix:", "unix://", "unix://host/sock", "unix://relative.sock",
		"tcp://127.0.0.1:7443", "https://hsmd:443", "127.0.0.1", ":7443", "localhost:",
		"unix:with\x00nul",
	} {
		if a, err := parseAddr(in); err == nil {
			t.Errorf("parseAddr(%q) = %+v, want an error", in, a)
		} else if !strings.HasPrefix(err.Error(), "hsmd client: ") {
			t.Errorf("parseAddr(%q) error %q lacks the package prefix", in, err)
		}
	}
}

func TestDialRefusesPlaintextToNonLoopback(t *testing.T) {
	for _, addr := range []string{"10.0.0.1:443", "hsmd.internal:7443", "[2001:db8::1]:443"} {
		c, err := Dial(t.Context(), addr)
		if err == nil {
			c.Close()
			t.Fatalf("Dial(%q) without credentials succeeded", addr)
		}
		if !strings.Contains(err.Error(), "WithTransportCredentials") {
			t.Errorf("Dial(%q) error %q does not say how to fix it", addr, err)
		}
	}
	// With credentials the address is accepted (Dial does not connect).
	c, err := Dial(t.Context(), "10.0.0.1:443", WithTransportCredentials(credentials.NewTLS(&tls.Config{})))
	if err != nil {
		t.Fatalf("Dial with credentials: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestDialBadOptions(t *testing.T) {
	if _, err := Dial(t.Context(), "unix:x.sock", WithMaxRecvMsgSize(0)); err == nil {
		t.Error("Dial accepted a zero receive limit")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := Dial(ctx, "unix:x.sock"); err == nil {
		t.Error("Dial accepted a done context")
	}
}

// TestDialForms connects through each address form and makes a call.
func TestDialForms(t *testing.T) {
	_, sock := startFake(t)
	dir := filepath.Dir(sock)

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveFake(t, tcp)

	t.Chdir(filepath.Dir(dir))
	rel := filepath.Join(filepath.Base(dir), "s.sock")
	for _, addr := range []string{
		"unix://" + sock,
		"unix:" + sock,
		"unix:" + rel,
		"unix://./" + rel,
		tcp.Addr().String(),
		strings.Replace(tcp.Addr().String(), "127.0.0.1", "localhost", 1),
	} {
		c, err := Dial(t.Context(), addr)
		if err != nil {
			t.Errorf("Dial(%q): %v", addr, err)
			continue
		}
		if _, err := c.EncryptOne(t.Context(), "t1", Item{Plaintext: []byte("x")}); err != nil {
			t.Errorf("EncryptOne via %q: %v", addr, err)
		}
		c.Close()
	}
}

func TestUnreachableIsUnavailable(t *testing.T) {
	c, err := Dial(t.Context(), "unix://"+filepath.Join(t.TempDir(), "nobody.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.EncryptOne(t.Context(), "t1", Item{Plaintext: []byte("x")})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("EncryptOne to a missing socket: %v, want Unavailable", err)
	}
}

func TestCloseTwice(t *testing.T) {
	_, c := dialFake(t)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	_, err := c.EncryptOne(t.Context(), "t1", Item{Plaintext: []byte("x")})
	if status.Code(err) != codes.Canceled {
		t.Fatalf("EncryptOne after Close: %v, want Canceled", err)
	}
}

func TestEncryptDecrypt(t *testing.T) {
	f, c := dialFake(t)
	ctx := t.Context()
	aad := map[string]string{"table": "users", "column": "ssn"}
	cts, ver, err := c.Encrypt(ctx, "t1", []Item{{Plaintext: []byte("a"), Context: aad}, {Plaintext: []byte("b"), Context: aad}})
	if err != nil {
		t.Fatal(err)
	}
	if ver != 3 || len(cts) != 2 {
		t.Fatalf("Encrypt = %d ciphertexts, version %d", len(cts), ver)
	}
	f.mu.Lock()
	if !maps.Equal(f.lastContext, aad) {
		t.Errorf("server saw context %v, want %v", f.lastContext, aad)
	}
	f.mu.Unlock()

	items := []CiphertextItem{
		{Ciphertext: cts[0], Context: aad},
		{Ciphertext: []byte("tampered")},
		{Ciphertext: []byte(ToText(cts[1])), Context: aad},
		{Ciphertext: []byte("garbage")},
		{Ciphertext: []byte("nokey")},
		{Ciphertext: []byte("okcode")},
	}
	rs, err := c.Decrypt(ctx, "", items)
	if err != nil {
		t.Fatal(err)
	}
	if rs[0].Err != nil || string(rs[0].Plaintext) != "a" {
		t.Errorf("item 0 = %q, %v", rs[0].Plaintext, rs[0].Err)
	}
	if rs[1].Err != ErrDecrypt || rs[1].Plaintext != nil {
		t.Errorf("tampered item: %v, want exactly ErrDecrypt", rs[1].Err)
	}
	if rs[2].Err != nil || string(rs[2].Plaintext) != "b" {
		t.Errorf("text-form item = %q, %v", rs[2].Plaintext, rs[2].Err)
	}
	var ie *ItemError
	if !errors.Is(rs[3].Err, ErrMalformed) || !errors.As(rs[3].Err, &ie) || ie.Code != codes.InvalidArgument {
		t.Errorf("malformed item: %#v", rs[3].Err)
	}
	if errors.Is(rs[3].Err, ErrDecrypt) {
		t.Errorf("malformed item is ErrDecrypt")
	}
	if !errors.As(rs[4].Err, &ie) || ie.Code != codes.Unavailable || ie.Reason != "UNAVAILABLE" || errors.Is(rs[4].Err, ErrMalformed) {
		t.Errorf("unavailable item: %#v", rs[4].Err)
	}
	if !strings.Contains(rs[4].Err.Error(), "key derivation unavailable") {
		t.Errorf("unavailable item message: %q", rs[4].Err)
	}
	if !errors.As(rs[5].Err, &ie) || ie.Code != codes.Unknown {
		t.Errorf("item error with code OK: %#v, want code Unknown", rs[5].Err)
	}
}

func TestDecryptOtherTenant(t *testing.T) {
	_, c := dialFake(t)
	ct, err := c.EncryptOne(t.Context(), "t1", Item{Plaintext: []byte("secret")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.DecryptOne(t.Context(), "t2", CiphertextItem{Ciphertext: ct}); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("DecryptOne under another tenant: %v, want ErrDecrypt", err)
	}
	pt, err := c.DecryptOne(t.Context(), "t1", CiphertextItem{Ciphertext: ct})
	if err != nil || string(pt) != "secret" {
		t.Fatalf("DecryptOne = %q, %v", pt, err)
	}
	if _, err := c.DecryptOne(t.Context(), "", CiphertextItem{Ciphertext: []byte("garbage")}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("DecryptOne(garbage): %v, want ErrMalformed", err)
	}
}

func TestEncryptErrors(t *testing.T) {
	_, c := dialFake(t)
	_, _, err := c.Encrypt(t.Context(), "missing", []Item{{Plaintext: []byte("x")}})
	if status.Code(err) != codes.NotFound {
		t.Errorf("unknown tenant: %v, want NotFound", err)
	}
	_, _, err = c.Encrypt(t.Context(), "short", []Item{{Plaintext: []byte("x")}})
	if err == nil || status.Code(err) != codes.Unknown || !strings.HasPrefix(err.Error(), "hsmd client: ") {
		t.Errorf("short response: %v, want a client error", err)
	}
}

func TestMessageSizes(t *testing.T) {
	// Above gRPC's 4 MiB default, within DefaultMaxMsgSize.
	_, c := dialFake(t)
	big := bytes.Repeat([]byte{'x'}, 5<<20)
	ct, err := c.EncryptOne(t.Context(), "t1", Item{Plaintext: big})
	if err != nil {
		t.Fatalf("5 MiB item: %v", err)
	}
	if pt, err := c.DecryptOne(t.Context(), "t1", CiphertextItem{Ciphertext: ct}); err != nil || !bytes.Equal(pt, big) {
		t.Fatalf("5 MiB round trip: %v", err)
	}

	_, small := dialFake(t, WithMaxSendMsgSize(1024))
	_, err = small.EncryptOne(t.Context(), "t1", Item{Plaintext: make([]byte, 2048)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("over the send limit: %v, want ResourceExhausted", err)
	}
	_, small = dialFake(t, WithMaxRecvMsgSize(1024))
	_, err = small.EncryptOne(t.Context(), "t1", Item{Plaintext: make([]byte, 2048)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("over the receive limit: %v, want ResourceExhausted", err)
	}
}

func TestConcurrentUse(t *testing.T) {
	_, c := dialFake(t)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			pt := []byte{byte(i)}
			ct, err := c.EncryptOne(t.Context(), "t1", Item{Plaintext: pt})
			if err != nil {
				t.Error(err)
				return
			}
			got, err := c.DecryptOne(t.Context(), "t1", CiphertextItem{Ciphertext: ct})
			if err != nil || !bytes.Equal(got, pt) {
				t.Errorf("round trip %d: %q, %v", i, got, err)
			}
		})
	}
	wg.Wait()
}

func TestTenants(t *testing.T) {
	f, c := dialFake(t)
	ctx := t.Context()
	for _, n := range []string{"carol", "alice", "bob", "dave", "eve"} {
		if _, err := c.CreateTenant(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.CreateTenant(ctx, "bob"); status.Code(err) != codes.AlreadyExists {
		t.Errorf("duplicate: %v, want AlreadyExists", err)
	}
	got, err := c.GetTenant(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	if got.Name != "bob" || got.ID == "" || got.CurrentVersion != 1 || len(got.Versions) != 1 ||
		got.Versions[0].KDKVersion != 1 || got.Versions[0].State != "enabled" || got.CreateTime.Unix() != 1700000000 {
		t.Errorf("GetTenant = %+v", got)
	}
	if _, err := c.GetTenant(ctx, "zed"); status.Code(err) != codes.NotFound {
		t.Errorf("unknown: %v, want NotFound", err)
	}

	all, err := c.ListTenants(ctx) // 3 pages of 2
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tn := range all {
		names = append(names, tn.Name)
	}
	if strings.Join(names, ",") != "alice,bob,carol,dave,eve" {
		t.Errorf("ListTenants = %v", names)
	}

	f.mu.Lock()
	f.loopToken = true
	f.mu.Unlock()
	if _, err := c.ListTenants(ctx); err == nil {
		t.Error("ListTenants did not stop on a repeated page token")
	}
}
