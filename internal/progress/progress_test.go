package progress

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"
)

// fakeClock is a settable clock.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }
func newMeter(buf *bytes.Buffer, tty bool, total, base int64) (*Meter, *fakeClock) {
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	m := New(buf, "hsmd: rewrap", total, base)
	m.tty, m.now, m.start, m.lastDraw = tty, clk.now, clk.t, clk.t
	return m, clk
}

func TestPlainLinesEveryFiveSeconds(t *testing.T) {
	var buf bytes.Buffer
	m, clk := newMeter(&buf, false, 1000, 0)
	for i := 1; i <= 100; i++ { // 10 s in steps of 100 ms
		clk.advance(100 * time.Millisecond)
		m.Set(int64(i*10), int64(i*10))
	}
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines in 10 s, want 2:\n%s", len(lines), buf.String())
	}
	if want := "hsmd: rewrap: 500 records, 50.0%, 100 items/s"; lines[0] != want {
		t.Errorf("line %q, want %q", lines[0], want)
	}
	if strings.Contains(buf.String(), "\r") {
		t.Error("plain output has \\r")
	}
	elapsed, rate := m.Finish()
	if elapsed != 10*time.Second || rate != 100 {
		t.Errorf("Finish = %v, %v", elapsed, rate)
	}
}

func TestTerminalRedrawsAtMostTenTimesASecond(t *testing.T) {
	var buf bytes.Buffer
	m, clk := newMeter(&buf, true, 0, 50)
	for i := 1; i <= 100; i++ { // 1 s in steps of 10 ms
		clk.advance(10 * time.Millisecond)
		m.Set(50+int64(i), 0)
	}
	if n := strings.Count(buf.String(), "\r"); n > 10 || n < 9 {
		t.Fatalf("%d redraws in 1 s", n)
	}
	if strings.Contains(buf.String(), "%") {
		t.Error("a percentage with an unknown size")
	}
	m.Finish()
	if !strings.HasSuffix(buf.String(), "150 records  100 items/s\n") {
		t.Errorf("last draw %q", buf.String()[strings.LastIndex(buf.String(), "\r"):])
	}
}

func TestBarPadsOverLongerLine(t *testing.T) {
	var buf bytes.Buffer
	m, clk := newMeter(&buf, true, 100, 0)
	clk.advance(time.Second)
	m.Set(1000, 100)
	first := buf.Len()
	buf.Reset()
	m.now = func() time.Time { return clk.t.Add(time.Hour) } // the rate drops: a shorter line
	m.Set(1001, 100)
	if buf.Len() != first {
		t.Fatalf("redraw is %d bytes, the first %d: leftovers stay visible", buf.Len(), first)
	}
	if !strings.Contains(buf.String(), "[##############################] 100.0%") {
		t.Errorf("bar %q", buf.String())
	}
}

func TestIsTerminal(t *testing.T) {
	if IsTerminal(&bytes.Buffer{}) {
		t.Error("a buffer is a terminal")
	}
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Error("a regular file is a terminal")
	}
}
