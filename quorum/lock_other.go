//go:build !unix

package quorum

// lockFile does nothing where flock is missing: FileSpent then serializes
// Spend calls within one process only.
func lockFile(string) (unlock func(), err error) { return func() {}, nil }
