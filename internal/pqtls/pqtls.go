// Package pqtls holds the TLS key-exchange policy hsmd's server and client
// share: the hybrid post-quantum groups, preferred first, and the
// classical fallbacks.
package pqtls

import (
	"crypto/tls"
	"slices"
)

// hybrid are the hybrid post-quantum key exchanges, most preferred first:
// ML-KEM-768 combined with X25519 or with P-256, so that a recorded
// session stays confidential if either half holds.
var hybrid = []tls.CurveID{tls.X25519MLKEM768, tls.SecP256r1MLKEM768}

// classical are offered after them unless only hybrids are allowed.
var classical = []tls.CurveID{tls.X25519, tls.CurveP256}

// Hybrid returns the hybrid groups, most preferred first (a new slice).
func Hybrid() []tls.CurveID { return slices.Clone(hybrid) }

// IsHybrid reports whether id is one of the hybrid groups.
func IsHybrid(id tls.CurveID) bool { return slices.Contains(hybrid, id) }

// Preferences returns the CurvePreferences to use: the hybrid groups, then
// (unless pqOnly) the classical ones.
func Preferences(pqOnly bool) []tls.CurveID {
	if pqOnly {
		return Hybrid()
	}
	return slices.Concat(hybrid, classical)
}
