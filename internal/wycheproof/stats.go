package wycheproof

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
)

// Stats counts the vectors a test ran, by expected result, and those it
// skipped, by reason. The zero value is ready to use.
type Stats struct {
	Run     map[Result]int
	Skipped map[string]int // reason -> vectors
}

// Record counts c as run and checks its outcome: accepted tells whether
// the code under test accepted the vector (verified, opened, computed the
// expected value); err is its error, if any, for the message. A valid
// vector must be accepted and an invalid one must not; an acceptable one
// may go either way. It returns an error describing a mismatch, or nil.
func (s *Stats) Record(c Case, accepted bool, err error) error {
	if s.Run == nil {
		s.Run = map[Result]int{}
	}
	s.Run[c.Result]++
	switch {
	case c.Result == Valid && !accepted:
		return fmt.Errorf("%v: rejected a valid vector: %v", c, err)
	case c.Result == Invalid && accepted:
		return fmt.Errorf("%v: accepted an invalid vector", c)
	}
	return nil
}

// Check is Record that reports a mismatch on t.
func (s *Stats) Check(t testing.TB, c Case, accepted bool, err error) {
	t.Helper()
	if e := s.Record(c, accepted, err); e != nil {
		t.Error(e)
	}
}

// Skip counts one vector as skipped for reason.
func (s *Stats) Skip(reason string) {
	if s.Skipped == nil {
		s.Skipped = map[string]int{}
	}
	s.Skipped[reason]++
}

// Total returns the number of vectors run.
func (s *Stats) Total() int {
	n := 0
	for _, v := range s.Run {
		n += v
	}
	return n
}

// String summarises the counts: "run 66 (valid 39, invalid 27); skipped
// 250 (reason: n; ...)".
func (s *Stats) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "run %d (valid %d, invalid %d, acceptable %d)", s.Total(), s.Run[Valid], s.Run[Invalid], s.Run[Acceptable])
	skipped := 0
	for _, n := range s.Skipped {
		skipped += n
	}
	fmt.Fprintf(&b, "; skipped %d", skipped)
	for i, r := range slices.Sorted(maps.Keys(s.Skipped)) {
		sep := ", "
		if i == 0 {
			sep = " ("
		}
		fmt.Fprintf(&b, "%s%s: %d", sep, r, s.Skipped[r])
	}
	if skipped > 0 {
		b.WriteString(")")
	}
	return b.String()
}

// Report logs the counts under name and fails t unless at least one
// vector of each result in want ran.
func (s *Stats) Report(t testing.TB, name string, want ...Result) {
	t.Helper()
	t.Logf("%s: %v", name, s)
	for _, r := range want {
		if s.Run[r] == 0 {
			t.Errorf("%s: no %s vector ran", name, r)
		}
	}
}
