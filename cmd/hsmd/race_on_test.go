//go:build race

package main

// raceEnabled: the test binary runs under the race detector, and so does
// the hsmd binary the tests build (hsmdBinary).
const raceEnabled = true
