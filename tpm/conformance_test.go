package tpm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	"github.com/hsmd/hsmd/tpm"
)

// nextNV hands out NV indices, so that counter tests on the simulator (whose
// NV memory lives as long as the process) never meet an earlier test's counter.
var nextNV atomic.Uint32

func init() { nextNV.Store(0x01000200) }

func freshNVIndex() uint32 { return nextNV.Add(1) }

// suite runs one conformance suite against a kind of TPM. newConfig returns
// the configuration of a TPM that no other test uses (a new swtpm, or the
// simulator with a fresh NV index). parallel says whether subtests may run
// in parallel (not on the simulator: one per process).
type suite struct {
	newConfig func(t *testing.T) tpm.Config
	parallel  bool
}

func runConformance(t *testing.T, s suite) {
	tests := []struct {
		name string
		fn   func(*testing.T, tpm.Config)
	}{
		{"SealRoundTrip", testSealRoundTrip},
		{"PCRPolicy", testPCRPolicy},
		{"CorruptBlob", testCorruptBlob},
		{"TamperedBlob", testTamperedBlob},
		{"Counter", testCounter},
		{"Concurrent", testConcurrent},
		{"ContextAndClose", testContextAndClose},
		{"Info", testInfo},
	}
	// Latency first and alone, before parallel subtests compete for the CPU.
	t.Run("Latency", func(t *testing.T) { testLatency(t, s.newConfig(t)) })
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if s.parallel {
				t.Parallel()
			}
			tc.fn(t, s.newConfig(t))
		})
	}
}

// openTPM opens a TPM and, at cleanup, checks that no transient handle is
// left and closes it.
func openTPM(t testing.TB, c tpm.Config) *tpm.TPM {
	t.Helper()
	tp, err := tpm.Open(context.Background(), c)
	if err != nil {
		t.Fatalf("Open(%+v): %v", c, err)
	}
	t.Cleanup(func() { checkedClose(t, tp) })
	return tp
}

func checkedClose(t testing.TB, tp *tpm.TPM) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if n, err := tp.TransientHandles(ctx); err != nil && !errors.Is(err, tpm.ErrClosed) {
		t.Errorf("TransientHandles: %v", err)
	} else if n != 0 {
		t.Errorf("%d transient handles left loaded", n)
	}
	if err := tp.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func testSealRoundTrip(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	ctx := context.Background()
	for _, n := range []int{0, 1, 32, tpm.MaxSecretSize} {
		secret := bytes.Repeat([]byte{byte(n + 1)}, n)
		blob, err := tp.Seal(ctx, secret)
		if err != nil {
			t.Fatalf("Seal(%d bytes): %v", n, err)
		}
		got, err := tp.Unseal(ctx, blob)
		if err != nil {
			t.Fatalf("Unseal(%d bytes): %v", n, err)
		}
		if !bytes.Equal(got, secret) {
			t.Fatalf("Unseal(%d bytes) = %x, want %x", n, got, secret)
		}
	}
	if _, err := tp.Seal(ctx, make([]byte, tpm.MaxSecretSize+1)); !errors.Is(err, tpm.ErrTooLarge) {
		t.Fatalf("Seal(%d bytes) = %v, want ErrTooLarge", tpm.MaxSecretSize+1, err)
	}
}

func testPCRPolicy(t *testing.T, c tpm.Config) {
	c.PCRs = []int{7, 8}
	tp := openTPM(t, c)
	ctx := context.Background()
	secret := []byte("pcr-bound secret")
	blob, err := tp.Seal(ctx, secret)
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.ExtendPCR(ctx, 16, []byte("outside the policy")); err != nil {
		t.Fatal(err)
	}
	if got, err := tp.Unseal(ctx, blob); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Unseal after extending PCR 16 (not in the policy): %v", err)
	}
	if err := tp.ExtendPCR(ctx, 8, []byte("inside the policy")); err != nil {
		t.Fatal(err)
	}
	got, err := tp.Unseal(ctx, blob)
	if !errors.Is(err, tpm.ErrPCRMismatch) {
		t.Fatalf("Unseal after extending PCR 8 = %v, want ErrPCRMismatch", err)
	}
	if got != nil || bytes.Contains([]byte(err.Error()), secret) {
		t.Fatalf("failed Unseal leaked the secret")
	}
	// Sealing again binds the new values.
	if blob, err = tp.Seal(ctx, secret); err != nil {
		t.Fatal(err)
	}
	if _, err := tp.Unseal(ctx, blob); err != nil {
		t.Fatalf("Unseal of a blob sealed after the change: %v", err)
	}
}

// expectRejected checks that Unseal of a damaged blob fails with one of the
// allowed errors and reveals nothing.
func expectRejected(t *testing.T, tp *tpm.TPM, what string, blob, secret []byte, allowed ...error) {
	t.Helper()
	got, err := tp.Unseal(context.Background(), blob)
	if err == nil {
		t.Fatalf("%s: Unseal succeeded (%d bytes)", what, len(got))
	}
	if !slices.ContainsFunc(allowed, func(e error) bool { return errors.Is(err, e) }) {
		t.Fatalf("%s: Unseal error = %v, want one of %v", what, err, allowed)
	}
	if got != nil || bytes.Contains([]byte(err.Error()), secret) {
		t.Fatalf("%s: failed Unseal leaked the secret", what)
	}
	t.Logf("%s: %v", what, err)
}

func testCorruptBlob(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	secret := []byte("do not leak this secret")
	blob, err := tp.Seal(context.Background(), secret)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 1, len(blob) / 3, len(blob) / 2, len(blob) - 33, len(blob) - 1} {
		bad := bytes.Clone(blob)
		bad[i] ^= 0x40
		expectRejected(t, tp, "flipped byte", bad, secret, tpm.ErrCorrupt, tpm.ErrWrongTPM)
	}
	for _, n := range []int{0, 1, 33, len(blob) / 2, len(blob) - 1} {
		expectRejected(t, tp, "truncated", blob[:n], secret, tpm.ErrCorrupt, tpm.ErrWrongTPM)
	}
	expectRejected(t, tp, "extended", append(bytes.Clone(blob), 0), secret, tpm.ErrCorrupt, tpm.ErrWrongTPM)
	expectRejected(t, tp, "huge", make([]byte, 1<<20), secret, tpm.ErrCorrupt)
}

// testTamperedBlob alters the sealed object inside a blob and fixes the
// checksum, so that the TPM's own checks are what rejects it.
func testTamperedBlob(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	secret := []byte("tampering must not reveal this")
	blob, err := tp.Seal(context.Background(), secret)
	if err != nil {
		t.Fatal(err)
	}
	mutations := map[string]func(*pb.SealedBytes){
		"priv":       func(sb *pb.SealedBytes) { sb.Priv[len(sb.Priv)/2] ^= 1 },
		"priv-short": func(sb *pb.SealedBytes) { sb.Priv = sb.Priv[:len(sb.Priv)-4] },
		"pub":        func(sb *pb.SealedBytes) { sb.Pub[len(sb.Pub)-1] ^= 1 },
		"pub-attrs":  func(sb *pb.SealedBytes) { sb.Pub[7] ^= 0x20 },
		"pcrs":       func(sb *pb.SealedBytes) { sb.Pcrs = append(sb.Pcrs, 23) },
	}
	for name, mutate := range mutations {
		sb := new(pb.SealedBytes)
		body := blob[2 : len(blob)-sha256.Size]
		if err := proto.Unmarshal(body, sb); err != nil {
			t.Fatalf("blob format changed? %v", err)
		}
		mutate(sb)
		expectRejected(t, tp, "tampered "+name, reencode(t, sb), secret,
			tpm.ErrCorrupt, tpm.ErrWrongTPM, tpm.ErrPCRMismatch)
	}
}

func reencode(t *testing.T, sb *pb.SealedBytes) []byte {
	body, err := proto.Marshal(sb)
	if err != nil {
		t.Fatal(err)
	}
	b := append([]byte{1, 0}, body...) // version 1, no flags
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

func testCounter(t *testing.T, c tpm.Config) {
	ctx := context.Background()
	tp := openTPM(t, c)
	if _, err := tp.ReadCounter(ctx); !errors.Is(err, tpm.ErrNoCounter) {
		t.Fatalf("ReadCounter before DefineCounter = %v, want ErrNoCounter", err)
	}
	if _, err := tp.IncrementCounter(ctx); !errors.Is(err, tpm.ErrNoCounter) {
		t.Fatalf("IncrementCounter before DefineCounter = %v, want ErrNoCounter", err)
	}
	if err := tp.DefineCounter(ctx); err != nil {
		t.Fatalf("DefineCounter: %v", err)
	}
	start, err := tp.ReadCounter(ctx)
	if err != nil {
		t.Fatalf("ReadCounter: %v", err)
	}
	for i := uint64(1); i <= 3; i++ {
		v, err := tp.IncrementCounter(ctx)
		if err != nil || v != start+i {
			t.Fatalf("IncrementCounter #%d = %d, %v; want %d", i, v, err, start+i)
		}
	}
	if err := tp.DefineCounter(ctx); !errors.Is(err, tpm.ErrCounterExists) {
		t.Fatalf("second DefineCounter = %v, want ErrCounterExists", err)
	}
	checkedClose(t, tp)
	tp = openTPM(t, c)
	if v, err := tp.ReadCounter(ctx); err != nil || v != start+3 {
		t.Fatalf("ReadCounter after Close/Open = %d, %v; want %d", v, err, start+3)
	}
}

func testConcurrent(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			secret := []byte{byte(i), 1, 2, 3}
			blob, err := tp.Seal(ctx, secret)
			if err == nil {
				var got []byte
				got, err = tp.Unseal(ctx, blob)
				if err == nil && !bytes.Equal(got, secret) {
					err = errors.New("wrong secret")
				}
			}
			if err == nil {
				err = tp.Ping(ctx)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func testContextAndClose(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := tp.Seal(ctx, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Seal with a cancelled context = %v, want context.Canceled", err)
	}
	if err := tp.Ping(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ping with a cancelled context = %v, want context.Canceled", err)
	}
	checkedClose(t, tp)
	if err := tp.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := tp.Ping(context.Background()); !errors.Is(err, tpm.ErrClosed) {
		t.Fatalf("Ping after Close = %v, want ErrClosed", err)
	}
	if _, err := tp.Unseal(context.Background(), []byte{1}); err == nil {
		t.Fatal("Unseal after Close succeeded")
	}
}

func testInfo(t *testing.T, c tpm.Config) {
	tp := openTPM(t, c)
	i := tp.Info()
	if i.Provider != c.Provider || i.Address != c.Address || !slices.Equal(i.PCRs, tpm.DefaultPCRs) {
		t.Fatalf("Info() = %+v for config %+v", i, c)
	}
	if c.NVIndex == 0 && i.NVIndex != tpm.DefaultNVIndex || c.NVIndex != 0 && i.NVIndex != c.NVIndex {
		t.Fatalf("Info().NVIndex = %#x for config %+v", i.NVIndex, c)
	}
	if i.String() == "" {
		t.Fatal("empty Info.String")
	}
}
