package hsm

import (
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	cryptorand "crypto/rand"
	"crypto/subtle"
	"fmt"
	"io"
	"log/slog"
)

// Marshalled root material: a format version byte, then KDK, Wrap,
// Ed25519Seed and P256Scalar, 32 bytes each.
const (
	// RootMaterialSize is the size of RootMaterial.Marshal's output.
	RootMaterialSize = 1 + 4*rootSecretSize
	// rootMaterialV1 is the format version byte.
	rootMaterialV1 = 0x01
	// maxScalarDraws bounds NewRootMaterial's rejection sampling: a
	// uniformly random 32-byte string is rejected with probability < 2^-32.
	maxScalarDraws = 64
)

// RootMaterial is the secret material of one version of the four root
// keys, drawn outside the HSM so that a ceremony can back it up (split
// among custodians) and import it onto tokens with ImportRoots. It must be
// kept secret and cleared (Clear) as soon as it has been imported or split.
// String, GoString and LogValue print REDACTED; Marshal is the only way to
// get the bytes out. Erasure is best effort: the PKCS#11 binding copies the
// values into C memory that it frees without clearing.
//
// A RootMaterial is not safe for concurrent use while it is being cleared.
type RootMaterial struct {
	KDK         []byte // 32 bytes: HMAC-SHA256 key of hsmd/kdk/vN
	Wrap        []byte // 32 bytes: AES-256 key of hsmd/wrap/vN
	Ed25519Seed []byte // 32 bytes: RFC 8032 private key (seed) of hsmd/sig-ed25519/vN
	P256Scalar  []byte // 32 bytes, big endian: ECDSA private scalar d, 0 < d < N, of hsmd/sig-p256/vN
}

// NewRootMaterial draws new root material from rand (crypto/rand if nil):
// 32 bytes each for KDK, Wrap and Ed25519Seed, in that order, then the
// P-256 scalar by rejection sampling (32-byte draws until one is in
// [1, N-1]). Errors: a read error of rand, or ErrInvalidMaterial if rand
// gives no valid scalar in 64 draws (it is broken).
func NewRootMaterial(rand io.Reader) (*RootMaterial, error) {
	if rand == nil {
		rand = cryptorand.Reader
	}
	m := &RootMaterial{}
	for _, dst := range []*[]byte{&m.KDK, &m.Wrap, &m.Ed25519Seed} {
		*dst = make([]byte, rootSecretSize)
		if _, err := io.ReadFull(rand, *dst); err != nil {
			m.Clear()
			return nil, fmt.Errorf("hsm: new root material: %w", err)
		}
	}
	m.P256Scalar = make([]byte, rootSecretSize)
	for range maxScalarDraws {
		if _, err := io.ReadFull(rand, m.P256Scalar); err != nil {
			m.Clear()
			return nil, fmt.Errorf("hsm: new root material: %w", err)
		}
		if validP256Scalar(m.P256Scalar) {
			if err := m.Validate(); err != nil {
				m.Clear()
				return nil, err
			}
			return m, nil
		}
	}
	m.Clear()
	return nil, fmt.Errorf("%w: no valid P-256 scalar in %d draws from the random source", ErrInvalidMaterial, maxScalarDraws)
}

// Validate checks that each field is 32 bytes and not all zero, and that
// P256Scalar is in [1, N-1]. Errors wrap ErrInvalidMaterial and never
// hold key bytes.
func (m *RootMaterial) Validate() error {
	if m == nil {
		return fmt.Errorf("%w: nil", ErrInvalidMaterial)
	}
	for _, f := range []struct {
		name string
		b    []byte
	}{{"KDK", m.KDK}, {"Wrap", m.Wrap}, {"Ed25519Seed", m.Ed25519Seed}, {"P256Scalar", m.P256Scalar}} {
		if len(f.b) != rootSecretSize {
			return fmt.Errorf("%w: %s is %d bytes, want %d", ErrInvalidMaterial, f.name, len(f.b), rootSecretSize)
		}
		if subtle.ConstantTimeCompare(f.b, make([]byte, rootSecretSize)) == 1 {
			return fmt.Errorf("%w: %s is all zero (cleared?)", ErrInvalidMaterial, f.name)
		}
	}
	if !validP256Scalar(m.P256Scalar) {
		return fmt.Errorf("%w: P256Scalar is not in [1, N-1]", ErrInvalidMaterial)
	}
	return nil
}

func validP256Scalar(b []byte) bool {
	_, err := ecdh.P256().NewPrivateKey(b)
	return err == nil
}

// Clear overwrites every field with zeros and sets it to nil. Safe on a
// nil or already cleared RootMaterial.
func (m *RootMaterial) Clear() {
	if m == nil {
		return
	}
	clear(m.KDK)
	clear(m.Wrap)
	clear(m.Ed25519Seed)
	clear(m.P256Scalar)
	*m = RootMaterial{}
}

// String returns "hsm.RootMaterial{REDACTED}": the material never prints.
func (m RootMaterial) String() string { return "hsm.RootMaterial{REDACTED}" }

// GoString is String, so that %#v prints no more than %v.
func (m RootMaterial) GoString() string { return m.String() }

// LogValue keeps the material out of structured logs.
func (m RootMaterial) LogValue() slog.Value { return slog.StringValue(m.String()) }

// Marshal returns the material as RootMaterialSize bytes: the format
// version 0x01, then KDK, Wrap, Ed25519Seed and P256Scalar. The result is
// secret; the caller must clear it. It panics if m is not valid (see
// Validate): NewRootMaterial and ParseRootMaterial only return valid
// material.
func (m *RootMaterial) Marshal() []byte {
	if err := m.Validate(); err != nil {
		panic("hsm: RootMaterial.Marshal: " + err.Error())
	}
	out := make([]byte, 0, RootMaterialSize)
	out = append(out, rootMaterialV1)
	out = append(out, m.KDK...)
	out = append(out, m.Wrap...)
	out = append(out, m.Ed25519Seed...)
	return append(out, m.P256Scalar...)
}

// ParseRootMaterial parses the output of Marshal. It copies b, which the
// caller may clear. Errors wrap ErrInvalidMaterial (wrong size, unknown
// format version, invalid values) and never hold key bytes.
func ParseRootMaterial(b []byte) (*RootMaterial, error) {
	if len(b) != RootMaterialSize {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrInvalidMaterial, len(b), RootMaterialSize)
	}
	if b[0] != rootMaterialV1 {
		return nil, fmt.Errorf("%w: unknown format version %d", ErrInvalidMaterial, b[0])
	}
	field := func(i int) []byte {
		return append([]byte(nil), b[1+i*rootSecretSize:1+(i+1)*rootSecretSize]...)
	}
	m := &RootMaterial{KDK: field(0), Wrap: field(1), Ed25519Seed: field(2), P256Scalar: field(3)}
	if err := m.Validate(); err != nil {
		m.Clear()
		return nil, err
	}
	return m, nil
}

// ed25519Public derives the Ed25519 public key of m.
func (m *RootMaterial) ed25519Public() ed25519.PublicKey {
	priv := ed25519.NewKeyFromSeed(m.Ed25519Seed)
	defer clear(priv)
	return append(ed25519.PublicKey(nil), priv[ed25519.SeedSize:]...)
}

// p256Public derives the ECDSA P-256 public key of m.
func (m *RootMaterial) p256Public() (*ecdsa.PublicKey, error) {
	k, err := ecdh.P256().NewPrivateKey(m.P256Scalar)
	if err != nil {
		return nil, fmt.Errorf("%w: P256Scalar: %w", ErrInvalidMaterial, err)
	}
	return ecdsa.ParseUncompressedPublicKey(elliptic.P256(), k.PublicKey().Bytes())
}
