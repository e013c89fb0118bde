package audit

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/signing"
)

// Wrapper seals the log's secrets under a key that never leaves the HSM
// (hsm.HSM.WrapSeal/WrapOpen: AES-256-GCM with the wrap key).
type Wrapper interface {
	WrapSeal(ctx context.Context, plaintext, aad []byte) ([]byte, error)
	WrapOpen(ctx context.Context, sealed, aad []byte) ([]byte, error)
}

// Files of the log's sealed secrets, in the audit directory.
const (
	MLDSAKeyFile   = "mldsa44.key"
	ContextKeyFile = "context-hmac.key"
)

// Keys are the log's two secrets held outside the HSM, each stored sealed
// under the HSM wrap key: the ML-DSA-44 checkpoint signing key (a seed) and
// the key of the caller-context HMACs. Clear them once used.
type Keys struct {
	MLDSA   []byte
	Context []byte
}

// Clear erases the keys (best effort).
func (k *Keys) Clear() { clear(k.MLDSA); clear(k.Context) }

// LoadKeys opens the log's sealed secrets in dir with w, creating them
// (from rnd, crypto/rand if nil) on the first start.
func LoadKeys(ctx context.Context, dir string, w Wrapper, rnd io.Reader) (*Keys, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	var k Keys
	var err error
	if k.MLDSA, err = loadOrCreate(ctx, filepath.Join(dir, MLDSAKeyFile), "hsmd/audit/mldsa-44/v1", w, func() ([]byte, error) {
		return signing.GenerateMLDSA(rnd)
	}); err != nil {
		return nil, err
	}
	if k.Context, err = loadOrCreate(ctx, filepath.Join(dir, ContextKeyFile), "hsmd/audit/context-hmac/v1", w, func() ([]byte, error) {
		b := make([]byte, 32)
		_, err := io.ReadFull(rnd, b)
		return b, err
	}); err != nil {
		k.Clear()
		return nil, err
	}
	return &k, nil
}

func loadOrCreate(ctx context.Context, path, aad string, w Wrapper, gen func() ([]byte, error)) ([]byte, error) {
	sealed, err := os.ReadFile(path)
	if err == nil {
		key, err := w.WrapOpen(ctx, sealed, []byte(aad))
		if err != nil {
			return nil, fmt.Errorf("audit: open %s under the HSM wrap key: %w", filepath.Base(path), err)
		}
		return key, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("audit: %w", err)
	}
	key, err := gen()
	if err != nil {
		return nil, fmt.Errorf("audit: new key: %w", err)
	}
	if sealed, err = w.WrapSeal(ctx, key, []byte(aad)); err != nil {
		clear(key)
		return nil, fmt.Errorf("audit: seal %s under the HSM wrap key: %w", filepath.Base(path), err)
	}
	if err := fsutil.WriteFileAtomic(path, sealed, 0o600); err != nil {
		clear(key)
		return nil, fmt.Errorf("audit: %w", err)
	}
	return key, nil
}

// verifierKeyer is a signer that can name its verifier key
// (signing.NoteSigner, signing.MLDSASigner).
type verifierKeyer interface{ VerifierKey() string }

// VerifierKeys returns the verifier key (C2SP signed-note text form) of
// each signer that can tell it.
func VerifierKeys(signers []note.Signer) []string {
	var out []string
	for _, s := range signers {
		if v, ok := s.(verifierKeyer); ok {
			out = append(out, v.VerifierKey())
		}
	}
	return out
}

// WriteVerifiers adds the verifier keys of the log's signers to
// VerifiersFile in dir, one per line, for `hsmd audit keys` and `hsmd
// audit verify`; keys already listed stay (after a signing key rotation
// the older checkpoints still need the older keys). They are public.
func WriteVerifiers(dir string, vkeys []string) error {
	all, err := ReadVerifiers(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, k := range vkeys {
		if !slices.Contains(all, k) {
			all = append(all, k)
		}
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, VerifiersFile), []byte(strings.Join(all, "\n")+"\n"), 0o644)
}

// ReadVerifiers reads the verifier keys WriteVerifiers wrote.
func ReadVerifiers(dir string) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(dir, VerifiersFile))
	if err != nil {
		return nil, fmt.Errorf("audit: read the verifier keys: %w", err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out, nil
}

// ParseVerifiers parses verifier keys of any type hsmd signs with
// (Ed25519 0x01, ECDSA P-256 0x02, ML-DSA-44 cosignature/v1 0x06, and
// Ed25519 cosignature/v1 0x04). The verifiers remember their key's type:
// Verify and Prove demand, of each checkpoint, a valid signature by one
// key of every type given (several keys of a type: the versions of a
// rotated key).
func ParseVerifiers(vkeys []string) ([]note.Verifier, error) {
	out := make([]note.Verifier, 0, len(vkeys))
	for _, k := range vkeys {
		v, err := tnote.NewVerifier(k)
		if err != nil {
			return nil, fmt.Errorf("audit: verifier key %q: %w", k, err)
		}
		out = append(out, typedVerifier{v, keyType(k)})
	}
	return out, nil
}

// typedVerifier is a verifier that knows its key's signature type.
type typedVerifier struct {
	note.Verifier
	typ byte
}

// keyType is the signature type byte of a verifier key, or 0.
func keyType(vkey string) byte {
	_, rest, _ := strings.Cut(vkey, "+")
	_, b64, _ := strings.Cut(rest, "+")
	b, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(b) == 0 {
		return 0
	}
	return b[0]
}
