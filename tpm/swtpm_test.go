package tpm_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm-tools/client"
	"github.com/google/go-tpm/legacy/tpm2"

	"github.com/hsmd/hsmd/tpm"
	"github.com/hsmd/hsmd/tpm/tpmtest"
)

func TestSwtpmWrongTPM(t *testing.T) {
	t.Parallel()
	a := openTPM(t, tpmtest.StartSwtpm(t).Config())
	b := openTPM(t, tpmtest.StartSwtpm(t).Config())
	secret := []byte("sealed on TPM a")
	blob, err := a.Seal(context.Background(), secret)
	if err != nil {
		t.Fatal(err)
	}
	expectRejected(t, b, "blob from another TPM", blob, secret, tpm.ErrWrongTPM)
}

// TestSwtpmKillRestart checks that a dead swtpm makes operations fail fast
// with ErrUnavailable, and that the same *TPM reconnects once it is back.
func TestSwtpmKillRestart(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	tp := openTPM(t, sw.Config())
	ctx := context.Background()
	secret := []byte("survives a power cycle")
	blob, err := tp.Seal(ctx, secret)
	if err != nil {
		t.Fatal(err)
	}
	sw.Kill()
	for _, op := range []func(context.Context) error{
		tp.Ping,
		func(ctx context.Context) error { _, err := tp.Unseal(ctx, blob); return err },
	} {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		start := time.Now()
		err := op(ctx)
		cancel()
		if !errors.Is(err, tpm.ErrUnavailable) {
			t.Fatalf("with swtpm killed: %v, want ErrUnavailable", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("with swtpm killed, the operation took %v", d)
		}
	}
	sw.Restart()
	if err := tp.Ping(ctx); err != nil {
		t.Fatalf("Ping after Restart: %v", err)
	}
	if got, err := tp.Unseal(ctx, blob); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal after Restart: %v", err)
	}
}

func TestSwtpmCounterSurvivesPowerCycle(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	tp := openTPM(t, sw.Config())
	ctx := context.Background()
	if err := tp.DefineCounter(ctx); err != nil {
		t.Fatal(err)
	}
	want, err := tp.IncrementCounter(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, cycle := range []func(){sw.Restart, sw.Kill} {
		cycle()
		sw.Restart() // after Kill: start again
		if got, err := tp.ReadCounter(ctx); err != nil || got != want {
			t.Fatalf("ReadCounter after a power cycle = %d, %v; want %d", got, err, want)
		}
	}
	// A power cycle resets PCRs: a blob sealed after extending PCR 7 no
	// longer unseals, one sealed before does again.
	before, err := tp.Seal(ctx, []byte("before"))
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.ExtendPCR(ctx, 7, []byte("boot change")); err != nil {
		t.Fatal(err)
	}
	if _, err := tp.Unseal(ctx, before); !errors.Is(err, tpm.ErrPCRMismatch) {
		t.Fatalf("Unseal after extending PCR 7 = %v, want ErrPCRMismatch", err)
	}
	sw.Restart()
	if _, err := tp.Unseal(ctx, before); err != nil {
		t.Fatalf("Unseal after a power cycle reset PCR 7: %v", err)
	}
}

// TestSwtpmFlushesLeftovers leaves a transient object loaded over a raw
// connection, as a crashed client would, and expects Open to flush it.
func TestSwtpmFlushesLeftovers(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	conn, err := net.Dial("unix", strings.TrimPrefix(sw.Address, "unix://"))
	if err != nil {
		t.Fatal(err)
	}
	srk, err := client.NewKey(&rawConn{conn}, tpm2.HandleOwner, client.SRKTemplateECC())
	if err != nil {
		t.Fatal(err)
	}
	_ = srk // left loaded on purpose
	if h, err := client.Handles(&rawConn{conn}, tpm2.HandleTypeTransient); err != nil || len(h) != 1 {
		t.Fatalf("leftover handles before Open: %v, %v; want one", h, err)
	}
	conn.Close()
	tp := openTPM(t, sw.Config())
	if n, err := tp.TransientHandles(context.Background()); err != nil || n != 0 {
		t.Fatalf("TransientHandles after Open = %d, %v; want 0", n, err)
	}
}

// rawConn lets go-tpm talk to swtpm directly: one Read returns one response.
type rawConn struct{ net.Conn }

func (c *rawConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p[:10])
	if err != nil || n < 10 {
		return n, err
	}
	size := int(p[2])<<24 | int(p[3])<<16 | int(p[4])<<8 | int(p[5])
	for n < size && err == nil {
		var m int
		m, err = c.Conn.Read(p[n:size])
		n += m
	}
	return n, err
}

func TestSwtpmUnreachable(t *testing.T) {
	t.Parallel()
	c := tpm.Config{Provider: tpm.ProviderSwtpm, Address: "unix:///nonexistent/hsmd/swtpm.sock"}
	start := time.Now()
	if _, err := tpm.Open(context.Background(), c); !errors.Is(err, tpm.ErrUnavailable) {
		t.Fatalf("Open of a missing socket = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Open of a missing socket took %v", d)
	}
}

// TestSwtpmPersistentSRK checks that blobs sealed with a transient SRK and
// with the persistent one at 0x81000002 are interchangeable, and that Seal
// does not persist the SRK itself.
func TestSwtpmPersistentSRK(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	ctx := context.Background()
	tp := openTPM(t, sw.Config())
	before, err := tp.Seal(ctx, []byte("transient SRK"))
	if err != nil {
		t.Fatal(err)
	}
	checkedClose(t, tp)

	conn, err := net.Dial("unix", strings.TrimPrefix(sw.Address, "unix://"))
	if err != nil {
		t.Fatal(err)
	}
	raw := &rawConn{conn}
	if h, err := client.Handles(raw, tpm2.HandleTypePersistent); err != nil || len(h) != 0 {
		t.Fatalf("persistent handles after Seal: %v, %v; want none", h, err)
	}
	if _, err := client.StorageRootKeyECC(raw); err != nil { // persists it at 0x81000002
		t.Fatal(err)
	}
	conn.Close()

	tp = openTPM(t, sw.Config())
	if got, err := tp.Unseal(ctx, before); err != nil || string(got) != "transient SRK" {
		t.Fatalf("Unseal with the persistent SRK of a blob sealed with a transient one: %v", err)
	}
	after, err := tp.Seal(ctx, []byte("persistent SRK"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tp.Unseal(ctx, after); err != nil || string(got) != "persistent SRK" {
		t.Fatalf("Unseal with the persistent SRK: %v", err)
	}
}

// TestSwtpmHungHonoursDeadline checks that a TPM that stops answering makes
// an operation fail at the context's deadline, and that the next operation
// after it answers again works.
func TestSwtpmHungHonoursDeadline(t *testing.T) {
	t.Parallel()
	sw := tpmtest.StartSwtpm(t)
	tp := openTPM(t, sw.Config())
	sw.Pause()
	t.Cleanup(sw.Resume) // before the leak check, if the test fails early
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	start := time.Now()
	err := tp.Ping(ctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping of a hung swtpm = %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Ping of a hung swtpm returned after %v", d)
	}
	sw.Resume()
	if err := tp.Ping(context.Background()); err != nil {
		t.Fatalf("Ping after the swtpm resumed: %v", err)
	}
	if _, err := tp.Seal(context.Background(), []byte("after a hang")); err != nil {
		t.Fatal(err)
	}
}
