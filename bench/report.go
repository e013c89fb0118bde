package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"maps"
	"math"
	"os"
	"runtime"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Machine describes where the run happened.
type Machine struct {
	CPU        string `json:"cpu"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	NumCPU     int    `json:"num_cpu"`
	GoVersion  string `json:"go_version"`
	OS         string `json:"os"`
}

// ThisMachine describes the machine this process runs on.
func ThisMachine() Machine {
	m := Machine{GOMAXPROCS: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(), GoVersion: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}

// Result is a whole run, as JSON.
type Result struct {
	Time     time.Time `json:"time"`
	Machine  Machine   `json:"machine"`
	Target   string    `json:"target"`
	Warmup   string    `json:"warmup"`
	Duration string    `json:"duration"`
	Reps     int       `json:"reps"`
	Points   []Point   `json:"points"`
}

// WriteJSON writes r, indented.
func (r *Result) WriteJSON(w io.Writer) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(r)
}

func us(d time.Duration) string {
	if d < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f", float64(d)/1e3)
}

// WriteTable writes one row per point (the median repetition).
func (r *Result) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "op\titem\tbatch\tconc\titems/s\tMB/s\t×raw AES-GCM\tp50 µs\tp99 µs\tp999 µs\tHSM calls/1k items\tclient CPU µs/item\tserver CPU µs/item\terrors\t")
	for i := range r.Points {
		p := &r.Points[i]
		batch := fmt.Sprint(p.Batch)
		if p.AutoBatch {
			batch = "1 (auto)"
		}
		if p.Skipped != "" {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\tskipped: %s\t\t\t\t\t\t\t\t\t\t\n", p.Op, SizeString(p.Size), batch, p.Concurrency, p.Skipped)
			continue
		}
		m := p.Median()
		hsm := "n/a"
		if m.HSMCallsPer1k >= 0 {
			hsm = fmt.Sprintf("%.3f", m.HSMCallsPer1k)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%.0f\t%.1f\t%.2f\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t\n",
			p.Op, SizeString(p.Size), batch, p.Concurrency, p.ItemsPerSec, p.MBPerSec, p.Ratio,
			us(m.P50), us(m.P99), us(m.P999), hsm, us(m.ClientCPUPerItem), us(m.ServerCPUPerItem), m.Errors)
	}
	return tw.Flush()
}

// series is one line of the chart.
type series struct {
	name   string
	dashed bool // raw AES-GCM
	dotted bool // decrypt
	color  string
	pts    [][2]float64 // item size, MB/s
}

var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"}

// WriteSVG draws throughput (MB/s of plaintext, log scale) against item
// size (log scale): one line per op, batch and concurrency (a colour per
// batch and concurrency; decrypt dotted), and a dashed line of raw
// AES-256-GCM per op, measured in the same run.
func (r *Result) WriteSVG(w io.Writer) error {
	byName := map[string]*series{}
	var order []string
	colors := map[string]string{} // by batch and callers: encrypt and decrypt share one
	add := func(name, config string, size, mbs float64) *series {
		s, ok := byName[name]
		if !ok {
			c, ok := colors[config]
			if !ok {
				c = palette[len(colors)%len(palette)]
				colors[config] = c
			}
			s = &series{name: name, color: c}
			byName[name] = s
			order = append(order, name)
		}
		s.pts = append(s.pts, [2]float64{size, mbs})
		return s
	}
	rawSeen := map[string]bool{}
	for i := range r.Points {
		p := &r.Points[i]
		if p.Skipped != "" || p.MBPerSec <= 0 || p.Size <= 0 {
			continue
		}
		batch := fmt.Sprintf("batch %d", p.Batch)
		if p.AutoBatch {
			batch = "single, auto-batched"
		}
		config := fmt.Sprintf("%s, %d callers", batch, p.Concurrency)
		add("hsmd "+p.Op+", "+config, config, float64(p.Size), p.MBPerSec).dotted = p.Op == OpDecrypt
		rawOp := "Seal"
		if p.Op == OpDecrypt {
			rawOp = "Open"
		}
		if k := fmt.Sprint(p.Op, p.Size); !rawSeen[k] && p.RawMBPerSec > 0 {
			rawSeen[k] = true
			s := add("raw AES-256-GCM "+rawOp, "raw "+rawOp, float64(p.Size), p.RawMBPerSec)
			s.dashed, s.color = true, "#000"
			if rawOp == "Open" {
				s.color = "#777"
			}
		}
	}
	sort.SliceStable(order, func(i, j int) bool { return !byName[order[i]].dashed && byName[order[j]].dashed })
	const (
		width, height          = 960, 560
		left, right, top, bott = 80, 330, 50, 60
	)
	minX, maxX, minY, maxY := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range byName {
		sort.Slice(s.pts, func(i, j int) bool { return s.pts[i][0] < s.pts[j][0] })
		for _, pt := range s.pts {
			minX, maxX = math.Min(minX, pt[0]), math.Max(maxX, pt[0])
			minY, maxY = math.Min(minY, pt[1]), math.Max(maxY, pt[1])
		}
	}
	bw := bufio.NewWriter(w)
	fmt.Fprintf(bw, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(bw, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	title := "hsmd throughput against item size"
	if r.Machine.CPU != "" {
		title += fmt.Sprintf(" (%s, %d CPUs)", r.Machine.CPU, r.Machine.GOMAXPROCS)
	}
	fmt.Fprintf(bw, `<text x="%d" y="24" font-size="15">%s</text>`+"\n", left, html.EscapeString(title))
	if len(order) == 0 {
		fmt.Fprintf(bw, `<text x="%d" y="%d">no measured point</text>`+"\n", left, height/2)
		fmt.Fprintln(bw, "</svg>")
		return bw.Flush()
	}
	lx0, lx1 := math.Log2(minX), math.Log2(maxX)
	if lx1-lx0 < 1 {
		lx0, lx1 = lx0-0.5, lx1+0.5
	}
	ly0, ly1 := math.Floor(math.Log10(minY)), math.Ceil(math.Log10(maxY))
	if ly1-ly0 < 1 {
		ly1 = ly0 + 1
	}
	pw, ph := float64(width-left-right), float64(height-top-bott)
	X := func(v float64) float64 { return float64(left) + (math.Log2(v)-lx0)/(lx1-lx0)*pw }
	Y := func(v float64) float64 { return float64(top) + ph - (math.Log10(v)-ly0)/(ly1-ly0)*ph }
	// Axes, grid and ticks.
	fmt.Fprintf(bw, `<rect x="%d" y="%d" width="%.0f" height="%.0f" fill="none" stroke="#444"/>`+"\n", left, top, pw, ph)
	for e := ly0; e <= ly1; e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if math.Log10(v) > ly1+1e-9 {
				break
			}
			y := Y(v)
			fmt.Fprintf(bw, `<line x1="%d" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#ddd"/>`+"\n", left, y, float64(left)+pw, y)
			fmt.Fprintf(bw, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y+4, strconvG(v))
		}
	}
	sizes := map[float64]bool{}
	for _, s := range byName {
		for _, pt := range s.pts {
			sizes[pt[0]] = true
		}
	}
	for _, v := range slices.Sorted(maps.Keys(sizes)) {
		x := X(v)
		fmt.Fprintf(bw, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%.0f" stroke="#eee"/>`+"\n", x, top, x, float64(top)+ph)
		fmt.Fprintf(bw, `<text x="%.1f" y="%.0f" text-anchor="middle">%s</text>`+"\n", x, float64(top)+ph+18, SizeString(int(v)))
	}
	fmt.Fprintf(bw, `<text x="%.0f" y="%d" text-anchor="middle">item size</text>`+"\n", float64(left)+pw/2, height-14)
	fmt.Fprintf(bw, `<text x="18" y="%.0f" text-anchor="middle" transform="rotate(-90 18 %.0f)">MB/s of plaintext (log scale)</text>`+"\n", float64(top)+ph/2, float64(top)+ph/2)
	// Lines and legend.
	for i, name := range order {
		s := byName[name]
		color, dash := s.color, ""
		switch {
		case s.dashed:
			dash = ` stroke-dasharray="8 4"`
		case s.dotted:
			dash = ` stroke-dasharray="2 3"`
		}
		var pts []string
		for _, pt := range s.pts {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", X(pt[0]), Y(pt[1])))
		}
		fmt.Fprintf(bw, `<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>`+"\n", color, dash, strings.Join(pts, " "))
		for _, pt := range s.pts {
			fmt.Fprintf(bw, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", X(pt[0]), Y(pt[1]), color)
		}
		ly := top + 10 + i*18
		lx := width - right + 16
		fmt.Fprintf(bw, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>`+"\n", lx, ly, lx+24, ly, color, dash)
		fmt.Fprintf(bw, `<text x="%d" y="%d">%s</text>`+"\n", lx+30, ly+4, html.EscapeString(name))
	}
	fmt.Fprintln(bw, "</svg>")
	return bw.Flush()
}

func strconvG(v float64) string {
	if v >= 1 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%g", v)
}
