package tpm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
)

// Timeouts of the socket backend, used when the context has no earlier deadline.
const (
	dialTimeout    = 5 * time.Second
	commandTimeout = 60 * time.Second
)

// retryable lists the commands that may be sent again after the connection
// broke between sending them and reading the response: they change no
// persistent TPM state (at most they load a transient object, and a fresh
// connection flushes those). NV_Increment, NV_DefineSpace, PCR_Extend and the
// like are absent on purpose: if their response is lost, whether they ran is
// unknown, and the error says so instead of running them twice.
var retryable = map[uint32]bool{
	uint32(tpm2.CmdGetCapability):     true,
	uint32(tpm2.CmdPCRRead):           true,
	uint32(tpm2.CmdReadPublicNV):      true,
	uint32(tpm2.CmdReadNV):            true,
	uint32(tpm2.CmdReadPublic):        true,
	uint32(tpm2.CmdCreatePrimary):     true,
	uint32(tpm2.CmdCreate):            true,
	uint32(tpm2.CmdLoad):              true,
	uint32(tpm2.CmdUnseal):            true,
	uint32(tpm2.CmdStartAuthSession):  true,
	uint32(tpm2.CmdPolicyPCR):         true,
	uint32(tpm2.CmdFlushContext):      true,
	uint32(tpm2.CmdStartup):           true,
	uint32(tpm2.CmdCertifyCreation):   true,
	uint32(tpm2.CmdGetRandom):         true,
	uint32(tpm2.CmdPolicyGetDigest):   true,
	uint32(tpm2.CmdContextSave):       true,
	uint32(tpm2.CmdReadClock):         true,
	uint32(tpm2.CmdPolicyCommandCode): true,
	uint32(tpm2.CmdLoadExternal):      true,
}

// sockBackend talks to a swtpm server socket (unix or TCP) carrying the raw
// TPM command stream. swtpm serves one connection at a time and has no
// resource manager, so the backend owns a single connection; on a fresh
// connection it sends TPM2_Startup(CLEAR) (ignoring "already started") and
// flushes the transient objects and sessions a previous client left behind.
//
// A command whose connection broke before any response byte was read is sent
// once more on a fresh connection when that is safe (see retryable).
type sockBackend struct {
	network, addr string
	conn          net.Conn
	gen           uint64
}

func newSockBackend(ctx context.Context, address string) (*sockBackend, error) {
	network, addr, err := parseAddress(address)
	if err != nil {
		return nil, err
	}
	s := &sockBackend{network: network, addr: addr}
	if err := s.connect(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *sockBackend) generation() uint64 { return s.gen }

func (s *sockBackend) close() error {
	if s.conn == nil {
		return nil
	}
	err := s.conn.Close()
	s.conn = nil
	return err
}

func (s *sockBackend) roundTrip(ctx context.Context, cmd []byte) ([]byte, error) {
	fresh := false
	if s.conn == nil {
		if err := s.connect(ctx); err != nil {
			return nil, err
		}
		fresh = true
	}
	resp, res, err := s.exchange(ctx, cmd)
	if err == nil {
		return resp, nil
	}
	s.close()
	retry := res == notSent || res == lostBeforeResponse && retryable[commandCode(cmd)]
	if !retry || fresh || ctx.Err() != nil {
		return nil, s.unavailable(ctx, cmd, res, err)
	}
	if err := s.connect(ctx); err != nil {
		return nil, err
	}
	if resp, res, err = s.exchange(ctx, cmd); err != nil {
		s.close()
		return nil, s.unavailable(ctx, cmd, res, err)
	}
	return resp, nil
}

// failure says how far a failed exchange got.
type failure int

const (
	notSent            failure = iota // the command was not wholly sent: swtpm did not run it
	lostBeforeResponse                // sent, then the peer went away before any response byte
	outOfStep                         // timeout or partial response: the command may still run
)

// exchange sends cmd on the current connection and reads the response.
func (s *sockBackend) exchange(ctx context.Context, cmd []byte) ([]byte, failure, error) {
	deadline := time.Now().Add(commandTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn := s.conn
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, notSent, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := conn.Write(cmd); err != nil {
		return nil, notSent, err
	}
	resp, started, err := readResponse(conn)
	var ne net.Error
	switch {
	case err == nil:
		return resp, 0, nil
	case started || errors.As(err, &ne) && ne.Timeout():
		return nil, outOfStep, err
	}
	return nil, lostBeforeResponse, err
}

func (s *sockBackend) unavailable(ctx context.Context, cmd []byte, res failure, err error) error {
	if err := ctxDone(ctx); err != nil {
		return fmt.Errorf("swtpm %s: %w", s.addr, err)
	}
	if res != notSent && !retryable[commandCode(cmd)] {
		return fmt.Errorf("%w: swtpm %s: connection lost after sending command %#x, which may have run; "+
			"re-read the state it changes before trying again: %v", ErrUnavailable, s.addr, commandCode(cmd), err)
	}
	return fmt.Errorf("%w: swtpm %s: %v", ErrUnavailable, s.addr, err)
}

// connect dials a new connection and prepares the TPM behind it.
func (s *sockBackend) connect(ctx context.Context) error {
	d := net.Dialer{Timeout: dialTimeout}
	conn, err := d.DialContext(ctx, s.network, s.addr)
	if err != nil {
		if err := ctxDone(ctx); err != nil {
			return err
		}
		return fmt.Errorf("%w: cannot connect to swtpm at %s (is it running?): %v", ErrUnavailable, s.addr, err)
	}
	s.conn = conn
	rw := &rawRW{s: s, ctx: ctx}
	if err := tpm2.Startup(rw, tpm2.StartupClear); err != nil && !isRC(err, tpm2.RCInitialize) {
		s.close()
		if err := ctxDone(ctx); err != nil {
			return err
		}
		return fmt.Errorf("%w: swtpm at %s: startup: %v", ErrUnavailable, s.addr, err)
	}
	if err := flushAll(rw); err != nil {
		s.close()
		if err := ctxDone(ctx); err != nil {
			return err
		}
		return fmt.Errorf("%w: swtpm at %s: flushing leftover handles: %v", ErrUnavailable, s.addr, err)
	}
	s.gen++
	return nil
}

// rawRW runs commands on the backend's current connection, without retry.
type rawRW struct {
	s    *sockBackend
	ctx  context.Context
	resp []byte
}

func (r *rawRW) Write(p []byte) (int, error) {
	resp, _, err := r.s.exchange(r.ctx, p)
	if err != nil {
		return 0, err
	}
	r.resp = resp
	return len(p), nil
}

func (r *rawRW) Read(p []byte) (int, error) {
	n := copy(p, r.resp)
	r.resp = nil
	return n, nil
}

func isRC(err error, code tpm2.RCFmt0) bool {
	var e tpm2.Error
	return errors.As(err, &e) && e.Code == code
}

// ctxDone returns the context's error, or context.DeadlineExceeded once its
// deadline has passed: a socket deadline set from it can fire just before the
// context's own timer.
func ctxDone(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return nil
}
