package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

const (
	headerSize      = 10      // TPM command and response header: tag, size, code
	maxResponseSize = 1 << 16 // cap on a response's claimed size before allocation
)

// backend runs one complete TPM command and returns one complete response.
// Calls are serialised by the owning TPM's mutex.
type backend interface {
	roundTrip(ctx context.Context, cmd []byte) ([]byte, error)
	// generation counts the connections made so far; it changes when the
	// backend reconnected (swtpm).
	generation() uint64
	close() error
}

// cmdRW adapts a backend to the io.ReadWriter that go-tpm expects (Write
// sends a command, the next Read returns its response) and carries the
// current operation's context. It is used under the TPM's mutex only.
type cmdRW struct {
	b    backend
	ctx  context.Context
	resp []byte

	cmds        int    // commands sent in this operation
	gen         uint64 // backend generation at the start of this operation
	failed      error  // first transport failure (not a TPM response code) in this operation
	interrupted bool   // the backend reconnected after this operation's first command
}

func (c *cmdRW) begin(ctx context.Context) {
	c.ctx, c.resp, c.cmds, c.failed, c.interrupted = ctx, nil, 0, nil, false
	c.gen = c.b.generation()
}

func (c *cmdRW) end() { c.ctx, c.resp = nil, nil }

// Write runs the command p. It fails without sending anything when the
// operation's context is done.
func (c *cmdRW) Write(p []byte) (int, error) {
	c.resp = nil
	if c.ctx == nil {
		return 0, errors.New("tpm: internal error: command outside an operation")
	}
	if err := c.ctx.Err(); err != nil {
		return 0, c.fail(err)
	}
	resp, err := c.b.roundTrip(c.ctx, p)
	if err != nil {
		return 0, c.fail(err)
	}
	if g := c.b.generation(); g != c.gen {
		c.interrupted = c.interrupted || c.cmds > 0
		c.gen = g
	}
	c.cmds++
	c.resp = resp
	return len(p), nil
}

// Read returns the response of the last command in one piece, as go-tpm
// expects of a TPM device.
func (c *cmdRW) Read(p []byte) (int, error) {
	if c.resp == nil {
		return 0, io.ErrUnexpectedEOF
	}
	if len(p) < len(c.resp) {
		return 0, fmt.Errorf("tpm: response of %d bytes does not fit a %d-byte read", len(c.resp), len(p))
	}
	n := copy(p, c.resp)
	c.resp = nil
	return n, nil
}

func (c *cmdRW) fail(err error) error {
	if c.failed == nil {
		c.failed = err
	}
	return err
}

// readResponse reads one response (header, then the size it announces) from r.
// started reports whether any byte was read, so that a caller knows if the
// stream is out of step.
func readResponse(r io.Reader) (resp []byte, started bool, err error) {
	hdr := make([]byte, headerSize)
	n, err := io.ReadFull(r, hdr)
	if err != nil {
		return nil, n > 0, err
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < headerSize || size > maxResponseSize {
		return nil, true, fmt.Errorf("tpm: response announces %d bytes", size)
	}
	resp = make([]byte, size)
	copy(resp, hdr)
	if _, err := io.ReadFull(r, resp[headerSize:]); err != nil {
		return nil, true, err
	}
	return resp, true, nil
}

// commandCode returns the command code of a marshalled command.
func commandCode(cmd []byte) uint32 {
	if len(cmd) < headerSize {
		return 0
	}
	return binary.BigEndian.Uint32(cmd[6:10])
}
