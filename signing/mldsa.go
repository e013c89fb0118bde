package signing

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/cloudflare/circl/sign/mldsa/mldsa44"
	"github.com/transparency-dev/formats/log"
	"golang.org/x/crypto/cryptobyte"
	"golang.org/x/mod/sumdb/note"
)

// MLDSAPrivateKeySize is the size of an ML-DSA-44 private key as this
// package holds it: the 32-byte FIPS 204 seed ξ (the same bytes that follow
// the type byte in a transparency-dev/formats "PRIVATE+KEY+…" ML-DSA key).
const MLDSAPrivateKeySize = mldsa44.SeedSize

var (
	// ErrInvalidKey: an ML-DSA private key has the wrong size. The error
	// never includes key bytes.
	ErrInvalidKey = errors.New("signing: invalid ML-DSA-44 private key")
	// ErrNotCheckpoint: an ML-DSA cosignature/v1 can only be made over a
	// checkpoint (origin, size, 32-byte root hash) without extension lines.
	ErrNotCheckpoint = errors.New("signing: note is not a checkpoint that cosignature/v1 can sign")
	// ErrDestroyed: the signer's key was erased by Destroy.
	ErrDestroyed = errors.New("signing: ML-DSA signer destroyed")
)

// GenerateMLDSA returns a new ML-DSA-44 private key (a 32-byte seed) read
// from rand (crypto/rand if nil). The caller owns the slice and should
// clear() it when done; hsmd stores it encrypted under the HSM wrap key.
func GenerateMLDSA(rand io.Reader) (priv []byte, err error) {
	if rand == nil {
		rand = cryptoRand
	}
	priv = make([]byte, MLDSAPrivateKeySize)
	if _, err := io.ReadFull(rand, priv); err != nil {
		clear(priv)
		return nil, fmt.Errorf("signing: generating ML-DSA-44 key: %w", err)
	}
	return priv, nil
}

var cryptoRand = rand.Reader

// MLDSASigner is a note.Signer making C2SP tlog-cosignature "cosignature/v1"
// ML-DSA-44 signatures (note signature type 0x06), the only ML-DSA note
// signature that transparency-dev/formats/note verifies. That format has
// cosignature (witness) semantics:
//
//   - the signed message is the binary subtree/v1 structure over
//     (signer name, timestamp, origin, 0, size, root hash), so Sign accepts
//     only a checkpoint "origin\nsize\nbase64(32-byte root)\n" and refuses
//     extension lines (the signature would not cover them: ErrNotCheckpoint);
//   - the signature is timestamp (8 bytes, big-endian Unix seconds, from the
//     host clock) || ML-DSA-44 signature (hedged, empty context).
//
// It is safe for concurrent use. String never prints the key.
type MLDSASigner struct {
	name string
	hash uint32
	pub  []byte // type || FIPS 204 public key encoding
	now  func() time.Time

	mu  sync.RWMutex
	key *mldsa44.PrivateKey // nil after Destroy
}

var _ note.Signer = (*MLDSASigner)(nil)

// NewMLDSASigner returns a cosignature/v1 signer named name for the
// ML-DSA-44 private key priv (as made by GenerateMLDSA). It does not keep
// priv: the caller may clear it once this returns. The expanded key stays in
// the signer until Destroy.
func NewMLDSASigner(name string, priv []byte) (*MLDSASigner, error) {
	if !isValidName(name) || len(name) > 255 {
		return nil, fmt.Errorf("%w %q", ErrInvalidName, name)
	}
	if len(priv) != MLDSAPrivateKeySize {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrInvalidKey, len(priv), MLDSAPrivateKeySize)
	}
	var seed [mldsa44.SeedSize]byte
	copy(seed[:], priv)
	pk, sk := mldsa44.NewKeyFromSeed(&seed)
	clear(seed[:])
	pub := append([]byte{TypeMLDSA44Cosi}, pk.Bytes()...)
	return &MLDSASigner{
		name: name,
		hash: keyHash(name, pub),
		pub:  pub,
		now:  time.Now,
		key:  sk,
	}, nil
}

// Name returns the key (cosigner) name.
func (s *MLDSASigner) Name() string { return s.name }

// KeyHash returns the key hash: SHA-256(name || "\n" || 0x06 || pubkey)[:4].
func (s *MLDSASigner) KeyHash() uint32 { return s.hash }

// VerifierKey returns "name+hash+base64(0x06||pubkey)", accepted by
// transparency-dev/formats/note.NewVerifier and NewMLDSAVerifier.
func (s *MLDSASigner) VerifierKey() string {
	return verifierKey(s.name, s.hash, s.pub[0], s.pub[1:])
}

// String describes the signer without its key.
func (s *MLDSASigner) String() string {
	return fmt.Sprintf("MLDSASigner{name: %s, hash: %08x, key: REDACTED}", s.name, s.hash)
}

// GoString is String, so %#v does not print the key either.
func (s *MLDSASigner) GoString() string { return s.String() }

// Sign returns a cosignature/v1 signature over the checkpoint msg (see
// MLDSASigner). It runs on the host CPU and takes no context.
func (s *MLDSASigner) Sign(msg []byte) ([]byte, error) {
	var c log.Checkpoint
	rest, err := c.Unmarshal(msg)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotCheckpoint, err)
	}
	switch {
	case len(rest) > 0:
		return nil, fmt.Errorf("%w: extension lines are not covered by cosignature/v1", ErrNotCheckpoint)
	case len(c.Hash) != 32:
		return nil, fmt.Errorf("%w: root hash of %d bytes, want 32", ErrNotCheckpoint, len(c.Hash))
	case len(c.Origin) > 255:
		return nil, fmt.Errorf("%w: origin longer than 255 bytes", ErrNotCheckpoint)
	}
	t := s.now().Unix()
	if t < 0 {
		return nil, errors.New("signing: clock before 1970")
	}
	m := subtreeMessage(s.name, uint64(t), c.Origin, 0, c.Size, c.Hash)

	sig := make([]byte, 8+mldsa44.SignatureSize)
	binary.BigEndian.PutUint64(sig, uint64(t))
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.key == nil {
		return nil, ErrDestroyed
	}
	if err := mldsa44.SignTo(s.key, m, nil, true, sig[8:]); err != nil {
		return nil, fmt.Errorf("signing: ML-DSA-44: %w", err)
	}
	return sig, nil
}

// Destroy overwrites the expanded private key (best effort) and makes
// further Sign calls fail with ErrDestroyed.
func (s *MLDSASigner) Destroy() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.key != nil {
		*s.key = mldsa44.PrivateKey{}
		s.key = nil
	}
}

// subtreeMessage is the C2SP tlog-cosignature subtree/v1 signed message:
//
//	struct {
//	   uint8 label[12] = "subtree/v1\n\0";
//	   opaque cosigner_name<1..2^8-1>;
//	   uint64 timestamp;
//	   opaque log_origin<1..2^8-1>;
//	   uint64 start;
//	   uint64 end;
//	   uint8 hash[32];
//	} cosigned_message;
//
// Callers check the name and origin lengths and the hash size.
func subtreeMessage(name string, t uint64, origin string, start, end uint64, hash []byte) []byte {
	var b cryptobyte.Builder
	b.AddBytes([]byte("subtree/v1\n\x00"))
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(name)) })
	b.AddUint64(t)
	b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(origin)) })
	b.AddUint64(start)
	b.AddUint64(end)
	b.AddBytes(hash)
	return b.BytesOrPanic()
}
