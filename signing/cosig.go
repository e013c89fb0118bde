package signing

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/transparency-dev/formats/log"
	"golang.org/x/mod/sumdb/note"
)

// TypeEd25519Cosi is the note signature type of C2SP tlog-cosignature
// "cosignature/v1" timestamped Ed25519 signatures.
const TypeEd25519Cosi byte = 0x04

// cosigV1Label starts the message a cosignature/v1 Ed25519 signature signs.
const cosigV1Label = "cosignature/v1\ntime "

// CosignatureSigner is a note.Signer making C2SP tlog-cosignature
// "cosignature/v1" Ed25519 signatures (note signature type 0x04) with an
// Ed25519 crypto.Signer — in hsmd, the HSM's Ed25519 key, which never
// leaves the HSM. It is what a witness returns from add-checkpoint, and
// matches transparency-dev/formats/note.NewSignerForCosignatureV1:
//
//   - the signed message is "cosignature/v1\ntime <t>\n" followed by the
//     note text, where t is the Unix time in seconds from the signer's
//     clock, never zero;
//   - the signature is t (8 bytes, big-endian) followed by the 64-byte
//     Ed25519 signature;
//   - the key hash is SHA-256(name || "\n" || 0x04 || public key)[:4].
//
// Sign accepts only a checkpoint note text (origin, decimal size, base64
// 32-byte root hash, then optional extension lines, which the signature
// covers but about which the witness asserts nothing); anything else is
// ErrNotCheckpoint. It is safe for concurrent use if the crypto.Signer is.
type CosignatureSigner struct {
	name string
	s    crypto.Signer
	pub  ed25519.PublicKey
	hash uint32
	now  func() time.Time
}

var _ note.Signer = (*CosignatureSigner)(nil)

// NewCosignatureV1Signer returns a cosignature/v1 signer named name (the
// witness name) over s, whose Public must be an ed25519.PublicKey (s.Sign
// then receives the whole message and crypto.Hash(0), as crypto/ed25519
// and hsmd's HSM signer expect). now is the clock of the signature
// timestamps (nil means time.Now). Errors: ErrInvalidName,
// ErrUnsupportedKey.
func NewCosignatureV1Signer(name string, s crypto.Signer, now func() time.Time) (*CosignatureSigner, error) {
	if !isValidName(name) {
		return nil, fmt.Errorf("%w %q", ErrInvalidName, name)
	}
	if s == nil {
		return nil, fmt.Errorf("%w: nil signer", ErrUnsupportedKey)
	}
	pub, ok := s.Public().(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w %T: cosignature/v1 needs Ed25519", ErrUnsupportedKey, s.Public())
	}
	if len(pub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: Ed25519 public key of %d bytes", ErrUnsupportedKey, len(pub))
	}
	if now == nil {
		now = time.Now
	}
	return &CosignatureSigner{
		name: name,
		s:    s,
		pub:  pub,
		hash: keyHash(name, append([]byte{TypeEd25519Cosi}, pub...)),
		now:  now,
	}, nil
}

// Name returns the key (witness) name.
func (s *CosignatureSigner) Name() string { return s.name }

// KeyHash returns the key hash: SHA-256(name || "\n" || 0x04 || pubkey)[:4].
func (s *CosignatureSigner) KeyHash() uint32 { return s.hash }

// VerifierKey returns "name+hash+base64(0x04||pubkey)", accepted by
// transparency-dev/formats/note.NewVerifierForCosignatureV1 and by tessera's
// witness policies.
func (s *CosignatureSigner) VerifierKey() string {
	return verifierKey(s.name, s.hash, TypeEd25519Cosi, s.pub)
}

// Sign returns a cosignature/v1 signature over the checkpoint note text
// msg. note.Signer's Sign takes no context: the call uses
// context.Background, so the crypto.Signer's own deadline (hsmd's HSM
// CallTimeout) bounds it; use SignContext or WithContext for a tighter
// bound. Each signature is checked against the public key before it is
// returned, so a faulty signer yields ErrBadSignature, never a bad note.
func (s *CosignatureSigner) Sign(msg []byte) ([]byte, error) {
	return s.SignContext(context.Background(), msg)
}

// SignContext is Sign bounded by ctx if the crypto.Signer has a
// SignContext(ctx, digest, opts) method; otherwise ctx is checked only
// before the call. Errors: ErrNotCheckpoint, ErrBadSignature, a clock at
// or before 1970, or the crypto.Signer's error (wrapped, naming the key).
func (s *CosignatureSigner) SignContext(ctx context.Context, msg []byte) ([]byte, error) {
	if err := checkCosignable(msg); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("signing: %w", err)
	}
	t := s.now().Unix()
	if t <= 0 {
		// tlog-witness: the cosignature timestamp must not be zero.
		return nil, errors.New("signing: cosignature/v1: clock at or before 1970")
	}
	m := cosigV1Message(uint64(t), msg)
	var sig []byte
	var err error
	if cs, ok := s.s.(contextSigner); ok {
		sig, err = cs.SignContext(ctx, m, crypto.Hash(0))
	} else {
		sig, err = s.s.Sign(rand.Reader, m, crypto.Hash(0))
	}
	if err != nil {
		return nil, fmt.Errorf("signing: %s: %w", s.name, err)
	}
	if len(sig) != ed25519.SignatureSize || !ed25519.Verify(s.pub, m, sig) {
		return nil, fmt.Errorf("%w (key %s)", ErrBadSignature, s.name)
	}
	out := make([]byte, 8, 8+ed25519.SignatureSize)
	binary.BigEndian.PutUint64(out, uint64(t))
	return append(out, sig...), nil
}

// WithContext returns a note.Signer, with the same name and key hash, whose
// Sign calls s.SignContext(ctx, msg); pass it to note.Sign.
func (s *CosignatureSigner) WithContext(ctx context.Context) note.Signer {
	return cosigCtxSigner{s: s, ctx: ctx}
}

type cosigCtxSigner struct {
	s   *CosignatureSigner
	ctx context.Context
}

func (c cosigCtxSigner) Name() string                    { return c.s.name }
func (c cosigCtxSigner) KeyHash() uint32                 { return c.s.hash }
func (c cosigCtxSigner) Sign(msg []byte) ([]byte, error) { return c.s.SignContext(c.ctx, msg) }

// checkCosignable returns ErrNotCheckpoint unless msg is a checkpoint note
// text with a 32-byte root hash.
func checkCosignable(msg []byte) error {
	var c log.Checkpoint
	if _, err := c.Unmarshal(msg); err != nil {
		return fmt.Errorf("%w: %v", ErrNotCheckpoint, err)
	}
	if len(c.Hash) != 32 {
		return fmt.Errorf("%w: root hash of %d bytes, want 32", ErrNotCheckpoint, len(c.Hash))
	}
	return nil
}

// cosigV1Message is the message a cosignature/v1 Ed25519 signature signs:
// "cosignature/v1\ntime <t>\n" followed by the note text.
func cosigV1Message(t uint64, text []byte) []byte {
	m := make([]byte, 0, len(cosigV1Label)+20+1+len(text))
	m = append(m, cosigV1Label...)
	m = strconv.AppendUint(m, t, 10)
	m = append(m, '\n')
	return append(m, text...)
}
