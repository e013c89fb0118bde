//go:build !cgo

package tpm

import (
	"errors"
	"sync"
)

// openSimulator fails: the go-tpm-tools simulator is C code and needs cgo.
func openSimulator(int64) (backend, *sync.Mutex, error) {
	return nil, nil, errors.New("tpm: provider simulator needs a binary built with cgo (CGO_ENABLED=1)")
}
