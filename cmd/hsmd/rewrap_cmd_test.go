package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hsmd/hsmd/client"
	"github.com/hsmd/hsmd/envelope/wire"
	"github.com/hsmd/hsmd/internal/ctstream"
)

func binaryStream(recs ...[]byte) []byte {
	var b bytes.Buffer
	rw := ctstream.NewWriter(&b, false, 0)
	for _, r := range recs {
		if err := rw.Put(r); err != nil {
			panic(err)
		}
	}
	if err := rw.Flush(); err != nil || rw.Written() != int64(b.Len()) {
		panic(fmt.Sprint("flush: ", err, rw.Written(), b.Len()))
	}
	return b.Bytes()
}

func TestRewrapBinaryFormatRoundTrip(t *testing.T) {
	var recs [][]byte
	for _, n := range []int{1, wire.Overhead, 1000, 200_000, 0, 3} {
		recs = append(recs, bytes.Repeat([]byte{byte(n)}, n))
	}
	stream := binaryStream(recs...)
	rr := ctstream.NewReader(bytes.NewReader(stream), false, 0, 0)
	for i, want := range recs {
		got, err := rr.Next()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("record %d: %d bytes, %v; want %d bytes", i+1, len(got), err, len(want))
		}
	}
	if _, err := rr.Next(); err != io.EOF {
		t.Fatalf("after the last record: %v, want io.EOF", err)
	}
	if rr.Records() != int64(len(recs)) || rr.Offset() != int64(len(stream)) {
		t.Fatalf("counted %d records, %d bytes; want %d, %d", rr.Records(), rr.Offset(), len(recs), len(stream))
	}
}

func TestRewrapBinaryOversizedLengthRefusedBeforeAllocation(t *testing.T) {
	for _, l := range []uint32{ctstream.MaxRecord + 1, 1<<32 - 1} {
		stream := binaryStream([]byte("first"))
		stream = binary.BigEndian.AppendUint32(stream, l)
		stream = append(stream, "only a few bytes follow"...)
		rr := ctstream.NewReader(bytes.NewReader(stream), false, 0, 0)
		if _, err := rr.Next(); err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := rr.Next()
		runtime.ReadMemStats(&after)
		var re *ctstream.RecordError
		if !errors.Is(err, ctstream.ErrTooLarge) || !errors.As(err, &re) || re.N != 2 {
			t.Fatalf("length %d: %v, want ctstream.ErrTooLarge at record 2", l, err)
		}
		if !strings.Contains(err.Error(), fmt.Sprint(l)) {
			t.Errorf("the error does not give the length: %v", err)
		}
		if d := after.TotalAlloc - before.TotalAlloc; d > 64<<10 {
			t.Errorf("length %d: %d bytes allocated before refusing", l, d)
		}
	}
}

func TestRewrapBinaryTruncatedRecord(t *testing.T) {
	full := binaryStream([]byte("first"), bytes.Repeat([]byte("x"), 100))
	// Cut 2 bytes into the second record's length prefix, and 10 bytes
	// into its ciphertext.
	for _, stream := range [][]byte{full[:9+2], full[:9+4+10]} {
		rr := ctstream.NewReader(bytes.NewReader(stream), false, 0, 0)
		if _, err := rr.Next(); err != nil {
			t.Fatal(err)
		}
		_, err := rr.Next()
		var re *ctstream.RecordError
		if !errors.Is(err, ctstream.ErrTruncated) || !errors.As(err, &re) || re.N != 2 {
			t.Fatalf("cut at %d: %v, want ctstream.ErrTruncated at record 2", len(stream), err)
		}
		if rr.Records() != 1 || rr.Offset() != 9 {
			t.Errorf("a truncated record was counted: %d records, %d bytes", rr.Records(), rr.Offset())
		}
	}
}

func TestRewrapTextLines(t *testing.T) {
	in := "hsmd:v1:AAAA\r\n  hsmd:v1:BBBB  \nhsmd:v1:CCCC" // CRLF, spaces, no final newline
	rr := ctstream.NewReader(strings.NewReader(in), true, 0, 0)
	for _, want := range []string{"hsmd:v1:AAAA", "hsmd:v1:BBBB", "hsmd:v1:CCCC"} {
		got, err := rr.Next()
		if err != nil || string(got) != want {
			t.Fatalf("%q, %v; want %q", got, err, want)
		}
	}
	if _, err := rr.Next(); err != io.EOF || rr.Offset() != int64(len(in)) {
		t.Fatalf("end: %v at %d", err, rr.Offset())
	}

	rr = ctstream.NewReader(strings.NewReader("hsmd:v1:AAAA\nhsmd:v1:BBBB\n \t\nhsmd:v1:CCCC\n"), true, 0, 0)
	rr.Next()
	rr.Next()
	_, err := rr.Next()
	if !errors.Is(err, ctstream.ErrBlankLine) || err.Error() != "line 3: blank line" {
		t.Fatalf("blank line: %v", err)
	}
}

// rewrapInProcess runs hsmd rewrap in this process twice: through run, for
// the exit status and what is printed, and through runRewrap, for the error
// value. It is for runs that refuse, or have nothing to do.
func rewrapInProcess(t *testing.T, args ...string) (int, string, error) {
	t.Helper()
	var stderr bytes.Buffer
	env := &cliEnv{stdin: strings.NewReader(""), stdout: io.Discard, stderr: &stderr, getenv: func(string) string { return "" }}
	code := run(context.Background(), env, append([]string{"rewrap"}, args...))
	printed := stderr.String()
	err := runRewrap(context.Background(), env, args)
	return code, printed, err
}

func TestRewrapRefusesToOverwriteOut(t *testing.T) {
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in"), filepath.Join(dir, "out")
	os.WriteFile(in, nil, 0o600)
	os.WriteFile(out, []byte("precious"), 0o600)
	code, stderr, err := rewrapInProcess(t, "--tenant", "acme", "--in", in, "--out", out)
	if !errors.Is(err, errOutputExists) || code != 1 {
		t.Fatalf("exit %d, %v", code, err)
	}
	if !strings.Contains(stderr, "hsmd: error: the output file exists: "+out) || !strings.Contains(stderr, "hsmd: hint:") || !strings.Contains(stderr, "--resume") {
		t.Errorf("stderr:\n%s", stderr)
	}
	if b, _ := os.ReadFile(out); string(b) != "precious" {
		t.Errorf("the output was changed: %q", b)
	}
}

func TestRewrapRefusesResumeFileOfAnotherRun(t *testing.T) {
	dir := t.TempDir()
	in, other, out, res := filepath.Join(dir, "in"), filepath.Join(dir, "other"), filepath.Join(dir, "out"), filepath.Join(dir, "resume")
	os.WriteFile(in, nil, 0o600)
	os.WriteFile(out, []byte("from the other run"), 0o600)
	st := resumeState{Version: resumeStateVersion, Input: other, Output: out, Format: "text", Tenant: "acme", Records: 7, InputOffset: 70, OutputLength: 18}
	if err := st.save(res); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--in", in, "--out", out, "--tenant", "acme"},                          // another input
		{"--in", other, "--out", out, "--tenant", "acme", "--format", "binary"}, // another format
		{"--in", other, "--out", out, "--tenant", "other"},                      // another tenant
	} {
		os.WriteFile(other, nil, 0o600)
		code, stderr, err := rewrapInProcess(t, append(args, "--resume", res)...)
		if !errors.Is(err, errResumeMismatch) || code != 1 || !strings.Contains(stderr, "hsmd: error: the resume file is of another run") {
			t.Fatalf("%v: exit %d, %v\n%s", args, code, err, stderr)
		}
	}
	// The same run, but its input changed size since it began.
	st.InputSize = 5
	st.save(res)
	os.WriteFile(other, []byte("1234567"), 0o600)
	if _, _, err := rewrapInProcess(t, "--in", other, "--out", out, "--tenant", "acme", "--resume", res); !errors.Is(err, errResumeMismatch) {
		t.Fatalf("changed input: %v", err)
	}
	if b, _ := os.ReadFile(out); string(b) != "from the other run" {
		t.Errorf("the output was changed: %q", b)
	}
	// A complete run: nothing to do.
	st.InputSize, st.Complete = 7, true
	st.save(res)
	code, stderr, err := rewrapInProcess(t, "--in", other, "--out", out, "--tenant", "acme", "--resume", res)
	if err != nil || code != 0 || !strings.Contains(stderr, "already complete: 7 records") {
		t.Fatalf("complete: exit %d, %v\n%s", code, err, stderr)
	}
}

// readResume reads a resume file, or returns nil while there is none.
func readResume(t *testing.T, path string) *resumeState {
	t.Helper()
	st, err := loadResumeState(path)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// rewrapE2E is a running deployment: a dev daemon in dir, and a client.
type rewrapE2E struct {
	dir string
	c   *client.Client
}

func startRewrapE2E(t *testing.T, tenant string) *rewrapE2E {
	t.Helper()
	dir := t.TempDir()
	startDaemon(t, serveCmd(t, dir))
	mustCLI(t, dir, "", "tenants", "create", tenant)
	c, err := client.Dial(context.Background(), "unix://"+filepath.Join(dir, "var", "hsmd.sock"),
		client.WithMaxRecvMsgSize(cliMsgSize), client.WithMaxSendMsgSize(cliMsgSize))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rewrapE2E{dir: dir, c: c}
}

func plaintextOf(i int) string { return fmt.Sprintf("record %06d", i) }

// encryptLines returns the text forms of plaintextOf(from..to-1).
func (e *rewrapE2E) encryptLines(t *testing.T, tenant string, aad map[string]string, from, to int) []string {
	t.Helper()
	items := make([]client.Item, 0, to-from)
	for i := from; i < to; i++ {
		items = append(items, client.Item{Plaintext: []byte(plaintextOf(i)), Context: aad})
	}
	cts, _, err := e.c.Encrypt(context.Background(), tenant, items)
	if err != nil {
		t.Fatal(err)
	}
	lines := make([]string, len(cts))
	for i, ct := range cts {
		lines[i] = client.ToText(ct)
	}
	return lines
}

// checkRewrapped checks that lines decrypt to plaintextOf(0..) and are all
// under version want.
func (e *rewrapE2E) checkRewrapped(t *testing.T, tenant string, aad map[string]string, lines []string, want uint32) {
	t.Helper()
	for start := 0; start < len(lines); start += 10_000 {
		end := min(start+10_000, len(lines))
		items := make([]client.CiphertextItem, 0, end-start)
		for i := start; i < end; i++ {
			ct, err := wire.DecodeText([]byte(lines[i]))
			if err != nil {
				t.Fatalf("record %d: %v", i+1, err)
			}
			h, _, err := wire.Parse(ct)
			if err != nil || h.KeyVersion != want {
				t.Fatalf("record %d: key version %d (%v), want %d", i+1, h.KeyVersion, err, want)
			}
			items = append(items, client.CiphertextItem{Ciphertext: ct, Context: aad})
		}
		res, err := e.c.Decrypt(context.Background(), tenant, items)
		if err != nil {
			t.Fatal(err)
		}
		for j, r := range res {
			if r.Err != nil || string(r.Plaintext) != plaintextOf(start+j) {
				t.Fatalf("record %d decrypts to %q, %v; want %q", start+j+1, r.Plaintext, r.Err, plaintextOf(start+j))
			}
		}
	}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// TestRewrapEndToEnd: 100,000 records under four key versions, rewrapped
// by the real binary, interrupted with SIGINT, resumed to completion.
func TestRewrapEndToEnd(t *testing.T) {
	const n, tenant = 100_000, "acme"
	begin := time.Now()
	e := startRewrapE2E(t, tenant)
	aad := map[string]string{"app": "billing"}
	var lines []string
	for b := 0; b < n/10_000; b++ {
		if b == 3 || b == 6 || b == 8 {
			if _, err := e.c.RotateKey(context.Background(), tenant); err != nil {
				t.Fatal(err)
			}
		}
		lines = append(lines, e.encryptLines(t, tenant, aad, b*10_000, (b+1)*10_000)...)
	}
	in, out, res := filepath.Join(e.dir, "in.txt"), filepath.Join(e.dir, "out.txt"), filepath.Join(e.dir, "rewrap.resume")
	if err := os.WriteFile(in, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := e.c.RotateKey(context.Background(), tenant)
	if err != nil {
		t.Fatal(err)
	}
	if k.CurrentVersion != 5 {
		t.Fatalf("current version %d, want 5", k.CurrentVersion)
	}
	t.Logf("setup: %v", time.Since(begin).Round(time.Millisecond))

	args := []string{"rewrap", "--tenant", tenant, "--in", in, "--out", out, "--batch", "500", "--resume", res, "--context", "app=billing"}
	cmd := exec.Command(hsmdBinary(t), args...)
	cmd.Dir = e.dir
	cmd.Env = append(os.Environ(), "HSMD_ADDR=")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var atSignal int64
poll:
	for {
		select {
		case err := <-done:
			t.Fatalf("rewrap ended (%v) before it could be interrupted: make --batch smaller\n%s", err, stderr.String())
		case <-time.After(2 * time.Millisecond):
		}
		if st := readResume(t, res); st != nil && st.Records >= 20_000 {
			if st.Complete {
				t.Fatal("rewrap completed before it could be interrupted: make --batch smaller")
			}
			atSignal = st.Records
			cmd.Process.Signal(syscall.SIGINT)
			break poll
		}
	}
	err = <-done
	first := stderr.String()
	if err == nil || !strings.Contains(first, "hsmd: error: interrupted after ") ||
		!strings.Contains(first, "hsmd: hint: run the same command again with --resume "+res+" to continue") {
		t.Fatalf("after SIGINT: %v\n%s", err, first)
	}
	st := readResume(t, res)
	if st.Complete || st.Records < atSignal || st.Records >= n || !strings.Contains(first, fmt.Sprintf("interrupted after %d records", st.Records)) {
		t.Fatalf("resume state after SIGINT: %+v\n%s", st, first)
	}
	t.Logf("interrupted after %d records (%d at the signal):\n%s", st.Records, atSignal, first)
	// What a crash in the middle of a batch would leave: output past the
	// last commit. The resumed run cuts it off.
	if fi, err := os.Stat(out); err != nil || fi.Size() != st.OutputLength {
		t.Fatalf("output after SIGINT: %v, want %d bytes (%v)", fi.Size(), st.OutputLength, err)
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("hsmd:v1:half-written\nhsmd:v1:AAA")
	f.Close()

	_, second, err := cli(t, e.dir, "", args...)
	if err != nil {
		t.Fatalf("resumed run: %v\n%s", err, second)
	}
	elapsed := time.Since(start)
	t.Logf("resumed run:\n%s", second)
	out2, errOut, err := cli(t, e.dir, "", args...)
	if err != nil || !strings.Contains(errOut, "already complete: 100000 records") || out2 != "" {
		t.Fatalf("third run: %v\n%s", err, errOut)
	}
	if st := readResume(t, res); !st.Complete || st.Records != n || st.Skipped != 0 {
		t.Fatalf("resume state at the end: %+v", st)
	}
	got := readLines(t, out)
	if len(got) != n {
		t.Fatalf("%d output records, want %d", len(got), n)
	}
	e.checkRewrapped(t, tenant, aad, got, k.CurrentVersion)
	t.Logf("rewrap of %d records (both runs): %v; whole test %v", n, elapsed.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
}

// TestRewrapFailedRecords: a record that fails stops the run at its number;
// with --skip-failed it is listed and copied unchanged; the binary format.
func TestRewrapFailedRecords(t *testing.T) {
	e := startRewrapE2E(t, "acme")
	mustCLI(t, e.dir, "", "tenants", "create", "other")
	lines := e.encryptLines(t, "acme", nil, 0, 5)
	lines[2] = e.encryptLines(t, "other", nil, 2, 3)[0] // another tenant's
	lines[3] = "hsmd:v1:not*base64"
	in, out, res, skip := filepath.Join(e.dir, "in"), filepath.Join(e.dir, "out"), filepath.Join(e.dir, "res"), filepath.Join(e.dir, "skip")
	os.WriteFile(in, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
	k, err := e.c.RotateKey(context.Background(), "acme")
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"rewrap", "--tenant", "acme", "--in", in, "--out", out, "--batch", "2", "--resume", res}
	_, errOut, err := cli(t, e.dir, "", args...)
	if err == nil || !strings.Contains(errOut, "hsmd: error: record 3: decryption failed") || !strings.Contains(errOut, "--skip-failed") {
		t.Fatalf("failed record: %v\n%s", err, errOut)
	}
	if st := readResume(t, res); st.Records != 2 || st.Complete {
		t.Fatalf("resume state after the failed record: %+v", st)
	}
	if got := readLines(t, out); len(got) != 2 {
		t.Fatalf("%d output records after the failed record, want 2 (the batch before it)", len(got))
	}

	_, errOut, err = cli(t, e.dir, "", append(args, "--skip-failed", skip)...)
	if err != nil || !strings.Contains(errOut, "2 failed records skipped") {
		t.Fatalf("with --skip-failed: %v\n%s", err, errOut)
	}
	got := readLines(t, out)
	if len(got) != 5 || got[2] != lines[2] || got[3] != lines[3] {
		t.Fatalf("output:\n%s", strings.Join(got, "\n"))
	}
	e.checkRewrapped(t, "acme", nil, got[:2], k.CurrentVersion)
	b, _ := os.ReadFile(skip)
	want := "record 3: decryption failed (wrong tenant or context, or not authentic)\n" +
		"record 4: malformed ciphertext: text form is not unpadded base64url\n"
	if string(b) != want {
		t.Fatalf("skip file:\n%s\nwant:\n%s", b, want)
	}

	// Binary, without --resume: records 1, 2 and 5, moved to a new version.
	k, err = e.c.RotateKey(context.Background(), "acme")
	if err != nil {
		t.Fatal(err)
	}
	var recs [][]byte
	for _, i := range []int{0, 1, 4} {
		ct, _ := wire.DecodeText([]byte(got[i]))
		recs = append(recs, ct)
	}
	bin, binOut := filepath.Join(e.dir, "in.bin"), filepath.Join(e.dir, "out.bin")
	os.WriteFile(bin, binaryStream(recs...), 0o600)
	mustCLI(t, e.dir, "", "rewrap", "--tenant", "acme", "--in", bin, "--out", binOut, "--format", "binary")
	f, err := os.Open(binOut)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rr := ctstream.NewReader(f, false, 0, 0)
	for j, i := range []int{0, 1, 4} {
		ct, err := rr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if h, _, _ := wire.Parse(ct); h.KeyVersion != k.CurrentVersion {
			t.Errorf("binary record %d: version %d, want %d", j+1, h.KeyVersion, k.CurrentVersion)
		}
		pt, err := e.c.DecryptOne(context.Background(), "acme", client.CiphertextItem{Ciphertext: ct})
		if err != nil || string(pt) != plaintextOf(i) {
			t.Errorf("binary record %d: %q, %v", j+1, pt, err)
		}
	}
	if _, err := rr.Next(); err != io.EOF {
		t.Errorf("after 3 binary records: %v", err)
	}
}
