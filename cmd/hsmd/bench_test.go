package main

import (
	"encoding/json"
	"encoding/xml"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hsmd/hsmd/bench"
)

// readBenchJSON parses hsmd bench's JSON and checks what every measured
// point must show.
func readBenchJSON(t *testing.T, path string, wantPoints int) *bench.Result {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r bench.Result
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("JSON: %v\n%s", err, b)
	}
	if len(r.Points) != wantPoints || r.Machine.GOMAXPROCS < 1 {
		t.Fatalf("%d points (want %d), machine %+v", len(r.Points), wantPoints, r.Machine)
	}
	for _, p := range r.Points {
		m := p.Median()
		// Steady state: the data keys were derived during the warm-up
		// (or before), so the measured phases make no HSM call.
		if p.Skipped != "" || p.ItemsPerSec <= 0 || p.RawMBPerSec <= 0 || m.P50 <= 0 || m.P999 < m.P50 ||
			m.HSMCallsPer1k != 0 || m.ClientCPUPerItem <= 0 || m.Errors != 0 {
			t.Errorf("point %s: %+v", p.Name(), p)
		}
	}
	return &r
}

// TestBenchInProcess runs `hsmd bench --in-process` briefly: every point
// of the sweep is measured against a real dev hsmd, the HSM calls are read
// from its metrics, and the table, JSON and chart come out.
func TestBenchInProcess(t *testing.T) {
	dir := t.TempDir()
	jsonPath, svgPath := filepath.Join(dir, "b.json"), filepath.Join(dir, "b.svg")
	out, errOut, err := cli(t, dir, "", "bench", "--in-process", "--ops", "encrypt,decrypt", "--sizes", "64,1KiB",
		"--batch", "1,20", "--concurrency", "2", "--autobatch", "--warmup", "100ms", "--duration", "250ms", "--reps", "2",
		"--json", jsonPath, "--svg", svgPath, "--progress", "on")
	if err != nil {
		t.Fatalf("hsmd bench: %v\n%s\n%s", err, out, errOut)
	}
	t.Logf("hsmd bench:\n%s", out)
	r := readBenchJSON(t, jsonPath, 8)
	for _, p := range r.Points {
		if len(p.Reps) != 2 || p.Reps[0].ServerCPUPerItem != -1 || p.AutoBatch != (p.Batch == 1) {
			t.Errorf("point %s: %d reps, server CPU %v (in process: unknown), auto-batch %v", p.Name(), len(p.Reps), p.Reps[0].ServerCPUPerItem, p.AutoBatch)
		}
	}
	if !strings.Contains(out, "in-process dev hsmd") || strings.Count(out, "\n") != 10 || !strings.Contains(out, "1 (auto)") {
		t.Errorf("table:\n%s", out)
	}
	if !strings.Contains(errOut, "hsmd bench") {
		t.Errorf("no progress on stderr: %q", errOut)
	}
	// --from-json prints the same table and draws the chart again.
	again, errOut, err := cli(t, dir, "", "bench", "--from-json", jsonPath, "--svg", filepath.Join(dir, "again.svg"))
	if err != nil || again != out {
		t.Errorf("--from-json: %v %s\n%s", err, errOut, again)
	}
	if b1, _ := os.ReadFile(svgPath); len(b1) == 0 || !fileEqual(t, svgPath, filepath.Join(dir, "again.svg")) {
		t.Error("--from-json drew another chart")
	}
	f, err := os.Open(svgPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d := xml.NewDecoder(f)
	var text strings.Builder
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("the chart is not well-formed: %v", err)
		}
		if cd, ok := tok.(xml.CharData); ok {
			text.Write(cd)
		}
	}
	if !strings.Contains(text.String(), "raw AES-256-GCM Seal") || !strings.Contains(text.String(), "hsmd decrypt, batch 20, 2 callers") {
		t.Errorf("chart text: %s", text.String())
	}
}

// TestBenchRemote measures a separately running daemon over its unix
// socket: the server's CPU per item comes from its metrics.
func TestBenchRemote(t *testing.T) {
	dir := t.TempDir()
	d := startDaemon(t, serveCmd(t, dir))
	jsonPath := filepath.Join(dir, "b.json")
	out, errOut, err := cli(t, dir, "", "bench", "--addr", "unix://./var/hsmd.sock", "--metrics", d.metrics,
		"--ops", "encrypt", "--sizes", "1KiB", "--batch", "50", "--concurrency", "1", "--warmup", "100ms", "--duration", "300ms", "--reps", "1",
		"--json", jsonPath, "--progress", "off")
	if err != nil {
		t.Fatalf("hsmd bench: %v\n%s\n%s", err, out, errOut)
	}
	r := readBenchJSON(t, jsonPath, 1)
	if m := r.Points[0].Median(); m.ServerCPUPerItem <= 0 {
		t.Errorf("server CPU per item %v, want a figure from process_cpu_seconds_total", m.ServerCPUPerItem)
	}
	if errOut != "" {
		t.Errorf("--progress off wrote to stderr: %q", errOut)
	}
	// A point over the per-call bound is skipped with a note, not sent.
	out, errOut, err = cli(t, dir, "", "bench", "--addr", "unix://./var/hsmd.sock", "--ops", "encrypt", "--sizes", "1MiB",
		"--batch", "100", "--concurrency", "1", "--duration", "100ms", "--reps", "1", "--progress", "off")
	if err != nil || !strings.Contains(out, "skipped: 100 × 1MiB exceeds 48 MiB per call") {
		t.Errorf("oversized point: %v\n%s\n%s", err, out, errOut)
	}
	// Bad input is a usage error.
	if _, errOut, err := cli(t, dir, "", "bench", "--sizes", "1GiB"); err == nil || !strings.Contains(errOut, "1GiB") {
		t.Errorf("bad size: %v %s", err, errOut)
	}
}

func fileEqual(t *testing.T, a, b string) bool {
	t.Helper()
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
}
