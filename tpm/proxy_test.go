package tpm_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hsmd/hsmd/tpm"
	"github.com/hsmd/hsmd/tpm/tpmtest"
)

const ccNVIncrement = 0x134

// faultProxy relays the TPM command stream between a client and swtpm. When
// dropResponseOf is set to a command code, it runs that command on swtpm and
// then hangs up on the client without relaying the response.
type faultProxy struct {
	addr           string // unix:///…
	upstream       string // socket path of swtpm
	dropResponseOf atomic.Uint32
}

func startFaultProxy(t *testing.T, sw *tpmtest.Swtpm) *faultProxy {
	dir, err := os.MkdirTemp("", "tpmproxy")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "proxy.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close(); os.RemoveAll(dir) })
	p := &faultProxy{addr: "unix://" + path, upstream: strings.TrimPrefix(sw.Address, "unix://")}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.serve(c) // one client at a time, like swtpm
		}
	}()
	return p
}

func (p *faultProxy) serve(client net.Conn) {
	defer client.Close()
	up, err := net.Dial("unix", p.upstream)
	if err != nil {
		return
	}
	defer up.Close()
	for {
		cmd, err := readFrame(client)
		if err != nil {
			return
		}
		if _, err := up.Write(cmd); err != nil {
			return
		}
		resp, err := readFrame(up)
		if err != nil {
			return
		}
		if binary.BigEndian.Uint32(cmd[6:10]) == p.dropResponseOf.Load() {
			p.dropResponseOf.Store(0)
			return // the command ran; the client never hears of it
		}
		if _, err := client.Write(resp); err != nil {
			return
		}
	}
}

func readFrame(r io.Reader) ([]byte, error) {
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, err
	}
	frame := make([]byte, binary.BigEndian.Uint32(hdr[2:6]))
	copy(frame, hdr)
	_, err := io.ReadFull(r, frame[10:])
	return frame, err
}

// TestLostIncrementResponse checks that an increment whose response is lost
// is not run again, that the error says so, and that ReadCounter tells the
// truth afterwards.
func TestLostIncrementResponse(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	p := startFaultProxy(t, sw)
	tp := openTPM(t, tpm.Config{Provider: tpm.ProviderSwtpm, Address: p.addr})
	ctx := context.Background()
	if err := tp.DefineCounter(ctx); err != nil {
		t.Fatal(err)
	}
	start, err := tp.ReadCounter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p.dropResponseOf.Store(ccNVIncrement)
	_, err = tp.IncrementCounter(ctx)
	if !errors.Is(err, tpm.ErrUnavailable) || !strings.Contains(err.Error(), "may have run") {
		t.Fatalf("IncrementCounter with its response lost = %v; want ErrUnavailable saying it may have run", err)
	}
	if v, err := tp.ReadCounter(ctx); err != nil || v != start+1 {
		t.Fatalf("ReadCounter after a lost increment = %d, %v; want %d (run once, not retried)", v, err, start+1)
	}
}

// TestReadRetriedOnNewConnection checks that a read-only command whose
// connection broke is sent again on a fresh connection, invisibly.
func TestReadRetriedOnNewConnection(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	p := startFaultProxy(t, sw)
	tp := openTPM(t, tpm.Config{Provider: tpm.ProviderSwtpm, Address: p.addr})
	ctx := context.Background()
	if err := tp.DefineCounter(ctx); err != nil {
		t.Fatal(err)
	}
	want, err := tp.ReadCounter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p.dropResponseOf.Store(0x14E) // TPM2_NV_Read
	if got, err := tp.ReadCounter(ctx); err != nil || got != want {
		t.Fatalf("ReadCounter across a broken connection = %d, %v; want %d", got, err, want)
	}
	if err := tp.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}
