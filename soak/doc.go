// Package soak holds hsmd's soak test (issue 11), and nothing else: see
// TestSoak in soak_test.go. It runs a whole hsmd in process — a SoftHSM
// token, the bbolt store, the audit log, the envelope engine and the gRPC
// server on a unix socket — at full load from several goroutines, samples
// the process every few seconds (RSS, goroutines, open PKCS#11 sessions,
// open file descriptors, Go heap, DEK cache counters) and fails on growth
// beyond the bounds stated in the test after a warm-up.
//
// Without HSMD_SOAK_DURATION it runs a 15-second form, so that `go test
// ./...` exercises it; `make soak DURATION=10m` runs the long form.
package soak
