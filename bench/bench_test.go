package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestHistogramQuantiles: quantiles of a known distribution are within the
// histogram's 1.6% of the exact order statistics.
func TestHistogramQuantiles(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var h Histogram
	var all []time.Duration
	for range 100_000 {
		// Log-uniform from 1 µs to 100 ms, as latencies spread.
		d := time.Duration(1e3 * math.Pow(10, r.Float64()*5))
		h.Record(d)
		all = append(all, d)
	}
	slices.Sort(all)
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999, 1} {
		exact := all[min(len(all)-1, int(q*float64(len(all)))-1)]
		got := h.Quantile(q)
		if rel := float64(got-exact) / float64(exact); rel > 0.016 || rel < -0.016 {
			t.Errorf("q%.3f = %v, exact %v (%.2f%% off)", q, got, exact, 100*rel)
		}
	}
	var empty Histogram
	if empty.Quantile(.5) != 0 || h.Count() != 100_000 {
		t.Fatal("empty histogram or count wrong")
	}
	var small Histogram
	for _, d := range []time.Duration{5, 7, 63} {
		small.Record(d)
	}
	if small.Quantile(0) != 5 || small.Quantile(.5) != 7 || small.Quantile(1) != 63 {
		t.Fatalf("exact small values: %v %v %v", small.Quantile(0), small.Quantile(.5), small.Quantile(1))
	}
	var m Histogram
	m.Merge(&h)
	m.Merge(&small)
	if m.Count() != 100_003 || m.Quantile(.5) != h.Quantile(.5) {
		t.Fatalf("merge: count %d, p50 %v vs %v", m.Count(), m.Quantile(.5), h.Quantile(.5))
	}
}

func TestSizes(t *testing.T) {
	for s, want := range map[string]int{"64": 64, "64B": 64, "1KiB": 1024, "16k": 16384, "1MiB": 1 << 20, " 2 MB": 2 << 20} {
		if got, err := ParseSize(s); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1", "1GiB", "x", "1.5KiB", "99999999999"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted", bad)
		}
	}
	for _, n := range []int{0, 64, 1000, 1024, 1536, 1 << 20} {
		if got, err := ParseSize(SizeString(n)); err != nil || got != n {
			t.Errorf("SizeString(%d) = %q, does not parse back", n, SizeString(n))
		}
	}
}

func sample() *Result {
	r := &Result{Machine: ThisMachine(), Target: "test", Reps: 1}
	for i, size := range []int{64, 1024, 16384} {
		for _, op := range []string{OpEncrypt, OpDecrypt} {
			p := Point{Op: op, Size: size, Batch: 1000, Concurrency: 2, RawMBPerSec: 2000 * float64(i+1)}
			p.Reps = []Rep{{Items: 100000, Elapsed: time.Second, P50: time.Millisecond, HSMCallsPer1k: 0, ClientCPUPerItem: 3 * time.Microsecond, ServerCPUPerItem: -1}}
			p.ItemsPerSec = 100000
			p.MBPerSec = p.ItemsPerSec * float64(size) / 1e6
			p.Ratio = p.MBPerSec / p.RawMBPerSec
			r.Points = append(r.Points, p)
		}
	}
	r.Points = append(r.Points, Point{Op: OpEncrypt, Size: 1 << 20, Batch: 10000, Concurrency: 1, Skipped: "too big <&>"})
	return r
}

// TestSVG: the chart is well-formed XML with a line per series and the raw
// AES-GCM lines, and escapes what it prints.
func TestSVG(t *testing.T) {
	var b bytes.Buffer
	if err := sample().WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	d := xml.NewDecoder(&b)
	polylines := 0
	var texts []string
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("the SVG is not well-formed XML: %v", err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			if tok.Name.Local == "polyline" {
				polylines++
			}
		case xml.CharData:
			texts = append(texts, string(tok))
		}
	}
	all := strings.Join(texts, "|")
	// 2 hsmd series (encrypt, decrypt) and 2 raw lines (Seal, Open).
	if polylines != 4 || !strings.Contains(all, "raw AES-256-GCM Seal") || !strings.Contains(all, "raw AES-256-GCM Open") || !strings.Contains(all, "16KiB") {
		t.Fatalf("%d polylines; texts %s", polylines, all)
	}
	// The same results draw the same bytes (no map order leaks out).
	var again bytes.Buffer
	if err := sample().WriteSVG(&again); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		var b2 bytes.Buffer
		sample().WriteSVG(&b2)
		if b2.String() != again.String() {
			t.Fatal("the chart differs between two drawings of the same results")
		}
	}
	var empty bytes.Buffer
	if err := (&Result{}).WriteSVG(&empty); err != nil || !strings.Contains(empty.String(), "no measured point") {
		t.Fatalf("empty chart: %v %s", err, empty.String())
	}
}

func TestJSONAndTable(t *testing.T) {
	r := sample()
	var b bytes.Buffer
	if err := r.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var back Result
	if err := json.Unmarshal(b.Bytes(), &back); err != nil || len(back.Points) != len(r.Points) || back.Points[2].Reps[0].P50 != time.Millisecond {
		t.Fatalf("JSON round trip: %v, %+v", err, back)
	}
	var tb bytes.Buffer
	if err := r.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	out := tb.String()
	if strings.Count(out, "\n") != len(r.Points)+1 || !strings.Contains(out, "skipped: too big") || !strings.Contains(out, "n/a") {
		t.Fatalf("table:\n%s", out)
	}
}

func TestRawAESGCM(t *testing.T) {
	for _, op := range []string{OpEncrypt, OpDecrypt} {
		if mbs := RawAESGCM(op, 1024, 1, 50*time.Millisecond); mbs < 10 {
			t.Errorf("raw AES-GCM %s at %.1f MB/s", op, mbs)
		}
	}
}

func TestRunRefusesBadSweeps(t *testing.T) {
	ctx := t.Context()
	for _, cfg := range []*Config{
		{Ops: []string{"sign"}, Sizes: []int{1}, Batches: []int{1}, Concurrency: []int{1}, Duration: time.Second, Reps: 1},
		{Ops: []string{OpEncrypt}, Sizes: []int{1}, Batches: []int{0}, Concurrency: []int{1}, Duration: time.Second, Reps: 1},
		{Ops: []string{OpEncrypt}, Sizes: []int{1}, Batches: []int{1}, Concurrency: []int{1}, Duration: time.Second, Reps: 0},
	} {
		if _, err := Run(ctx, cfg); err == nil {
			t.Errorf("Run(%+v) accepted", cfg)
		}
	}
	// Points over the per-call bound are skipped, not sent.
	ps, err := Run(ctx, &Config{Ops: []string{OpEncrypt}, Sizes: []int{1 << 20}, Batches: []int{10000}, Concurrency: []int{1}, Duration: time.Second, Reps: 1})
	if err != nil || len(ps) != 1 || ps[0].Skipped == "" {
		t.Fatalf("oversized point: %+v, %v", ps, err)
	}
}
