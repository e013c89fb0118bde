// Package progress shows the progress of a long-running CLI command on a
// writer (normally stderr): on a terminal, a bar redrawn in place with \r
// at most ten times a second; elsewhere (a file, a pipe, a test buffer), a
// plain line every five seconds, so logs stay readable.
//
// It counts records done and, when the input's size is known, bytes read,
// and computes the rate from the records done since the meter was made.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

const (
	// TerminalInterval is the least time between two redraws of the bar.
	TerminalInterval = 100 * time.Millisecond
	// PlainInterval is the time between two plain progress lines.
	PlainInterval = 5 * time.Second

	barWidth = 30
)

// IsTerminal reports whether w is an *os.File on a character device (a
// terminal). Anything else gets plain lines.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// Meter draws the progress of one run. Its methods are safe for concurrent
// use. Call Finish once at the end; it stops the ticker Start started.
type Meter struct {
	mu       sync.Mutex
	w        io.Writer
	label    string
	tty      bool
	total    int64 // bytes; <= 0 when unknown
	base     int64 // records done before this run
	records  int64
	bytes    int64
	now      func() time.Time
	start    time.Time
	lastDraw time.Time
	width    int // of the last bar drawn, to blank its leftovers
	drawn    bool
	stop     chan struct{}
	stopped  chan struct{}
}

// New returns a meter writing to w, its lines starting with label. total is
// the input's size in bytes (0 or less when unknown: no percentage is
// shown); base is the number of records already done by an earlier run, so
// the rate counts this run only.
func New(w io.Writer, label string, total, base int64) *Meter {
	m := &Meter{w: w, label: label, tty: IsTerminal(w), total: total, base: base, records: base, now: time.Now}
	m.start = m.now()
	m.lastDraw = m.start
	return m
}

// Start redraws the meter in the background while no Set comes (a slow
// batch), until Finish.
func (m *Meter) Start() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stop != nil {
		return
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	m.stop, m.stopped = stop, stopped
	interval := time.Second
	if m.tty {
		interval = TerminalInterval
	}
	go func() {
		defer close(stopped)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				m.mu.Lock()
				m.maybeDraw()
				m.mu.Unlock()
			}
		}
	}()
}

// Set records the progress: records done in all (base included) and bytes
// of the input read. It redraws if the last draw is old enough.
func (m *Meter) Set(records, bytes int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.records, m.bytes = records, bytes
	m.maybeDraw()
}

// Finish stops the background redraws and, on a terminal, draws the bar a
// last time and ends its line. It returns the time since New and the rate
// of this run in records per second.
func (m *Meter) Finish() (elapsed time.Duration, perSecond float64) {
	m.mu.Lock()
	stop, stopped := m.stop, m.stopped
	m.stop = nil
	m.mu.Unlock()
	if stop != nil {
		close(stop)
		<-stopped
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.tty && m.drawn {
		m.draw()
		fmt.Fprintln(m.w)
	}
	return m.elapsed(), m.rate()
}

func (m *Meter) elapsed() time.Duration { return m.now().Sub(m.start) }

// rate is records per second done since New.
func (m *Meter) rate() float64 {
	s := m.elapsed().Seconds()
	if s <= 0 {
		return 0
	}
	return float64(m.records-m.base) / s
}

func (m *Meter) maybeDraw() {
	interval := PlainInterval
	if m.tty {
		interval = TerminalInterval
	}
	if m.now().Sub(m.lastDraw) < interval {
		return
	}
	m.draw()
}

func (m *Meter) draw() {
	m.lastDraw, m.drawn = m.now(), true
	if !m.tty {
		fmt.Fprintln(m.w, m.line())
		return
	}
	var b strings.Builder
	b.WriteString(m.label)
	if pct, ok := m.percent(); ok {
		full := int(pct / 100 * barWidth)
		fmt.Fprintf(&b, " [%s%s] %5.1f%%", strings.Repeat("#", full), strings.Repeat("-", barWidth-full), pct)
	}
	fmt.Fprintf(&b, "  %d records  %.0f items/s", m.records, m.rate())
	s := b.String()
	pad := max(m.width-len(s), 0)
	m.width = len(s)
	fmt.Fprint(m.w, "\r"+s+strings.Repeat(" ", pad))
}

// line is the plain progress line: label, records, percentage when the
// size is known, rate.
func (m *Meter) line() string {
	s := fmt.Sprintf("%s: %d records", m.label, m.records)
	if pct, ok := m.percent(); ok {
		s += fmt.Sprintf(", %.1f%%", pct)
	}
	return s + fmt.Sprintf(", %.0f items/s", m.rate())
}

func (m *Meter) percent() (float64, bool) {
	if m.total <= 0 {
		return 0, false
	}
	return min(100, float64(m.bytes)*100/float64(m.total)), true
}
