package hsm

import "time"

// WithTestRecoveryTimings returns c with the recovery hold-down and
// maximum backoff set below their lower bounds, so that tests run fast.
func WithTestRecoveryTimings(c Config, holdDown, maxBackoff time.Duration) Config {
	c.testHoldDown, c.testMaxBackoff = holdDown, maxBackoff
	return c
}
