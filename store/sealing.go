package store

import (
	"context"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
)

// Sealing: a store opened with a Sealer authenticates its records with the
// local state key (which it never sees) so that an offline edit of the data
// directory is detected at start, and binds them to the value of the TPM's
// rollback counter, so that a restored older copy is refused.
//
// Every record gets a MAC over its stored bytes; the store keeps a State
// whose Digest is a MAC over every (name, record MAC) pair in name order,
// recomputed in each write transaction (adding, removing or replacing any
// record changes it, and only the key holder can compute it; a linear
// combination such as an XOR of record MACs would let records from older
// copies be mixed in), and whose Counter is the rollback counter value it
// was last bound to. The State itself is MAC'd. Writes update the record
// MAC, the digest and the State in the same transaction as the record.

var (
	// ErrTampered: the store does not match its MACs. The error names what
	// differs; the data directory was changed outside hsmd (or another
	// state key is in use).
	ErrTampered = errors.New("store: the data does not match its seal")
	// ErrNotSealed: the store has no sealed state (never sealed).
	ErrNotSealed = errors.New("store: not sealed")
)

// Sealer computes MACs under the local state key. Implementations must be
// safe for concurrent use.
type Sealer interface {
	MAC(msg []byte) [32]byte
	// NewMAC returns a new HMAC-SHA256 under the key, for digests over
	// many records.
	NewMAC() hash.Hash
}

// State is the sealed summary of a store.
type State struct {
	Counter uint64   // the rollback counter value the state is bound to
	Digest  [32]byte // MAC over every record's (name, MAC), in name order
}

// Sealed is a Store whose records are authenticated: what a backend opened
// with a Sealer implements.
type Sealed interface {
	Store
	// Verify checks every record and the state, and returns the state.
	// Errors: one wrapping ErrTampered that names the record or says what
	// differs; ErrNotSealed if the store was never sealed.
	Verify(ctx context.Context) (State, error)
	// Reseal recomputes every record's MAC and binds the state to counter,
	// trusting the current content: at init, or to adopt a store.
	Reseal(ctx context.Context, counter uint64) error
	// SetCounter binds the (verified) state to counter.
	SetCounter(ctx context.Context, counter uint64) error
}

const (
	recordLabel = "hsmd/store/record/v1\x00"
	stateLabel  = "hsmd/store/state/v1\x00"
	digestLabel = "hsmd/store/digest/v1\x00"
)

// RecordMAC is the MAC of the record stored under (kind, key) as value.
func RecordMAC(s Sealer, kind, key string, value []byte) [32]byte {
	msg := make([]byte, 0, len(recordLabel)+len(kind)+len(key)+len(value)+16)
	msg = append(msg, recordLabel...)
	msg = appendField(msg, []byte(kind))
	msg = appendField(msg, []byte(key))
	msg = append(msg, value...)
	return s.MAC(msg)
}

func appendField(b, f []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
	return append(b, f...)
}

// Digester computes State.Digest: feed it every record's name and MAC in
// name order.
type Digester struct{ h hash.Hash }

// NewDigester starts a digest under s.
func NewDigester(s Sealer) *Digester {
	h := s.NewMAC()
	h.Write([]byte(digestLabel))
	return &Digester{h: h}
}

// Add feeds one record.
func (d *Digester) Add(name string, mac []byte) {
	d.h.Write(appendField(appendField(nil, []byte(name)), mac))
}

// Sum returns the digest.
func (d *Digester) Sum() (out [32]byte) {
	d.h.Sum(out[:0])
	return out
}

type sealedState struct {
	Counter uint64 `json:"counter"`
	Digest  []byte `json:"digest"`
	MAC     []byte `json:"mac"`
}

func (st State) mac(s Sealer) [32]byte {
	msg := binary.BigEndian.AppendUint64([]byte(stateLabel), st.Counter)
	return s.MAC(append(msg, st.Digest[:]...))
}

// EncodeState returns the stored form of st, MAC'd with s.
func EncodeState(s Sealer, st State) []byte {
	m := st.mac(s)
	b, _ := json.Marshal(sealedState{Counter: st.Counter, Digest: st.Digest[:], MAC: m[:]})
	return b
}

// DecodeState parses and checks a stored state. An error wraps ErrTampered.
func DecodeState(s Sealer, b []byte) (State, error) {
	var ss sealedState
	if err := json.Unmarshal(b, &ss); err != nil || len(ss.Digest) != 32 || len(ss.MAC) != 32 {
		return State{}, fmt.Errorf("%w: the sealed state record is malformed", ErrTampered)
	}
	st := State{Counter: ss.Counter}
	copy(st.Digest[:], ss.Digest)
	if m := st.mac(s); subtle.ConstantTimeCompare(m[:], ss.MAC) != 1 {
		return State{}, fmt.Errorf("%w: the sealed state record was changed (or another state key is in use)", ErrTampered)
	}
	return st, nil
}
