package tpm

import (
	"context"
	"fmt"
	"os"
)

// devBackend talks to a kernel TPM character device. With /dev/tpmrm0 the
// kernel's resource manager virtualises handles per open file and flushes them
// when the file is closed. A command in flight cannot be interrupted: the
// context is checked before each command only.
type devBackend struct {
	path string
	f    *os.File
}

func newDevBackend(path string) (*devBackend, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot open TPM device %s (does it exist, and may this user open it? "+
			"the tss group usually may): %v", ErrUnavailable, path, err)
	}
	return &devBackend{path: path, f: f}, nil
}

func (d *devBackend) generation() uint64 { return 1 }

func (d *devBackend) close() error { return d.f.Close() }

func (d *devBackend) roundTrip(ctx context.Context, cmd []byte) ([]byte, error) {
	if _, err := d.f.Write(cmd); err != nil {
		return nil, fmt.Errorf("%w: TPM device %s: %v", ErrUnavailable, d.path, err)
	}
	// The kernel returns the whole response to one read.
	buf := make([]byte, maxResponseSize)
	n, err := d.f.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("%w: TPM device %s: %v", ErrUnavailable, d.path, err)
	}
	if n < headerSize {
		return nil, fmt.Errorf("%w: TPM device %s: short response (%d bytes)", ErrUnavailable, d.path, n)
	}
	return buf[:n], nil
}
