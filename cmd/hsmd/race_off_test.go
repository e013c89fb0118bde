//go:build !race

package main

// raceEnabled: see race_on_test.go. Without -race (benchmarks) the hsmd
// binary is built without the race detector, so its speed is the real one.
const raceEnabled = false
