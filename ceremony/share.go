package ceremony

// Custody shares: M-of-N Shamir shares of root key material, each signed by
// an ephemeral ceremony key and encrypted to one custodian's age recipient.
//
// A Share is JSON inside an age file (armored). Its Signature is Ed25519 by
// the ceremony key over shareSignedMessage: a domain-separated, length-
// prefixed encoding of every other field. Its SecretDigest is SHA-256 over
// a domain-separated encoding of the ceremony ID and the secret, so a
// restore can tell the right secret from a wrong one; the secret must
// therefore be high-entropy key material (MinSecretSize bytes at least),
// never a password. The ceremony private key lives only inside SplitSecret.
//
// Erasure is best effort: SplitSecret, OpenShare and CombineShares clear
// the plaintext buffers they own once done, but Go may have copied them
// (garbage collector, stack growth), and age and encoding/json keep
// internal buffers this package cannot reach. Callers clear the secret
// CombineShares returns and call Share.Clear when done with a Share.
//
// The functions are safe for concurrent use; a Share must not be modified
// while CombineShares reads it.

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode"
	"unicode/utf8"

	"filippo.io/age"
	"filippo.io/age/armor"
)

const (
	// ShareVersion is the version of the Share format and its signature.
	ShareVersion = 1
	// MinSecretSize and MaxSecretSize bound the secret SplitSecret takes.
	MinSecretSize = 16
	MaxSecretSize = 4096
	// MaxSealedShareSize bounds the sealed share OpenShare reads.
	MaxSealedShareSize = 64 << 10

	shareMaxPlaintext = 16 << 10 // a valid Share's JSON is at most ~11 KiB
	shareMaxText      = 256      // bytes in a ceremony ID, label or custodian name
	shareMaxTries     = 4096     // subsets tried to find an inconsistent share

	shareSigContext    = "hsmd/ceremony/share/v1"
	shareDigestContext = "hsmd/ceremony/secret-digest/v1"
)

var (
	// ErrTooFewShares: fewer shares than the threshold were given.
	ErrTooFewShares = errors.New("ceremony: too few shares")
	// ErrSecretMismatch: the shares rebuild a secret whose digest is not
	// the ceremony's.
	ErrSecretMismatch = errors.New("ceremony: the shares do not rebuild the ceremony's secret")
	// ErrShareDecrypt: a sealed share could not be decrypted (wrong
	// identity, altered or truncated ciphertext). The age error is wrapped
	// too, e.g. *age.NoIdentityMatchError.
	ErrShareDecrypt = errors.New("ceremony: cannot decrypt share")
	// ErrUnsupportedRecipient: not an age X25519 or hybrid recipient.
	ErrUnsupportedRecipient = errors.New("ceremony: unsupported age recipient")
	// ErrSplitParams: SplitSecret's arguments are invalid.
	ErrSplitParams = errors.New("ceremony: invalid split parameters")

	// The causes a *ShareError wraps.
	ErrMalformedShare     = errors.New("malformed share")
	ErrBadSignature       = errors.New("share signature does not verify")
	ErrForeignShare       = errors.New("share is not from this ceremony")
	ErrDuplicateShare     = errors.New("share index given twice")
	ErrCiphertextMismatch = errors.New("sealed share differs from the ceremony record")
)

// ShareError names the share at fault: its index and custodian as the
// share claims them (unauthenticated when Err is ErrMalformedShare or
// ErrBadSignature). Err is one of the Err… causes above; Reason says more.
// It never holds secret bytes.
type ShareError struct {
	Index     int
	Custodian string
	Reason    string
	Err       error
}

func (e *ShareError) Error() string {
	if e.Index == 0 && e.Custodian == "" {
		return "ceremony: share: " + e.Reason
	}
	name := e.Custodian
	if len(name) > 64 {
		name = name[:64] + "..."
	}
	return fmt.Sprintf("ceremony: share %d (custodian %q): %s", e.Index, name, e.Reason)
}

func (e *ShareError) Unwrap() error { return e.Err }

func shareErr(s *Share, cause error, format string, args ...any) error {
	return &ShareError{Index: s.Index, Custodian: s.Custodian, Reason: fmt.Sprintf(format, args...), Err: cause}
}

// Share is one custodian's share, the plaintext of a sealed share. Data is
// secret: Share prints as REDACTED and Clear overwrites it.
type Share struct {
	Version      int               `json:"version"`
	CeremonyID   string            `json:"ceremony_id"`
	Label        string            `json:"label"`
	Index        int               `json:"index"` // x-coordinate, 1..Total
	Threshold    int               `json:"threshold"`
	Total        int               `json:"total"`
	Custodian    string            `json:"custodian"`
	Data         []byte            `json:"data"` // Shamir share: y values, then Index
	SecretDigest []byte            `json:"secret_digest"`
	CeremonyKey  ed25519.PublicKey `json:"ceremony_key"`
	Signature    []byte            `json:"signature"`
}

// Format prints the share's public fields and REDACTED for Data, whatever
// the verb.
func (s Share) Format(f fmt.State, _ rune) {
	fmt.Fprintf(f, "ceremony.Share{CeremonyID: %q, Label: %q, Index: %d, Threshold: %d, Total: %d, Custodian: %q, Data: REDACTED}",
		s.CeremonyID, s.Label, s.Index, s.Threshold, s.Total, s.Custodian)
}

// Clear overwrites the share's secret data (best effort).
func (s *Share) Clear() { clear(s.Data) }

// Custodian holds one share: Recipient is an age X25519 ("age1…") or
// ML-KEM-768+X25519 hybrid ("age1pq1…") recipient.
type Custodian struct {
	Name      string
	Recipient string
}

// SplitParams configures SplitSecret. Rand, if non-nil, replaces
// crypto/rand for the ceremony key and the Shamir polynomials (tests only;
// age always draws its own randomness).
type SplitParams struct {
	CeremonyID string
	Label      string
	Threshold  int
	Custodians []Custodian // share i+1 goes to Custodians[i]
	Rand       io.Reader
}

// SealedShare is one encrypted share, for its custodian's output file.
type SealedShare struct {
	Index      int
	Custodian  string
	Ciphertext []byte // armored age file
	SHA256     []byte // SHA-256 of Ciphertext
}

// CeremonyPublic is the public record of a split, for the ceremony's
// signed transcript and for CombineShares' expect argument.
type CeremonyPublic struct {
	Version      int               `json:"version"`
	CeremonyID   string            `json:"ceremony_id"`
	Label        string            `json:"label"`
	Threshold    int               `json:"threshold"`
	Total        int               `json:"total"`
	CeremonyKey  ed25519.PublicKey `json:"ceremony_key"`
	SecretDigest []byte            `json:"secret_digest"`
	Shares       []ShareRecord     `json:"shares"` // Shares[i].Index == i+1
}

// ShareRecord is the public record of one sealed share.
type ShareRecord struct {
	Index            int    `json:"index"`
	Custodian        string `json:"custodian"`
	CiphertextSHA256 []byte `json:"ciphertext_sha256"`
}

// CheckSealed checks that sealed is the ciphertext recorded for share
// index. Errors: a *ShareError wrapping ErrCiphertextMismatch (or
// ErrForeignShare for an index the record does not have).
func (p *CeremonyPublic) CheckSealed(index int, sealed []byte) error {
	if index < 1 || index > len(p.Shares) {
		return &ShareError{Index: index, Reason: "no such share in the ceremony record", Err: ErrForeignShare}
	}
	rec := p.Shares[index-1]
	sum := sha256.Sum256(sealed)
	if rec.Index != index || !bytes.Equal(sum[:], rec.CiphertextSHA256) {
		return &ShareError{Index: index, Custodian: rec.Custodian,
			Reason: fmt.Sprintf("ciphertext SHA-256 %x is not the recorded %x", sum, rec.CiphertextSHA256), Err: ErrCiphertextMismatch}
	}
	return nil
}

// ParseRecipient parses an age X25519 ("age1…") or ML-KEM-768+X25519
// hybrid ("age1pq1…") recipient. SSH keys, passphrases, plugin and tagged
// recipients are refused with ErrUnsupportedRecipient, whose message does
// not quote the input (it may be a secret key pasted by mistake); a
// malformed X25519 or hybrid recipient's error quotes it.
func ParseRecipient(s string) (age.Recipient, error) {
	hrp := ""
	if i := strings.LastIndexByte(s, '1'); i > 0 {
		hrp = strings.ToLower(s[:i])
	}
	switch {
	case hrp == "age1pq":
		r, err := age.ParseHybridRecipient(s)
		if err != nil {
			return nil, fmt.Errorf("ceremony: %w", err)
		}
		return r, nil
	case hrp == "age":
		r, err := age.ParseX25519Recipient(s)
		if err != nil {
			return nil, fmt.Errorf("ceremony: %w", err)
		}
		return r, nil
	case strings.HasPrefix(hrp, "age-secret-key"):
		return nil, fmt.Errorf("%w: this is an age identity (a secret key): give its recipient (\"age-keygen -y\")", ErrUnsupportedRecipient)
	}
	return nil, fmt.Errorf("%w: want an X25519 \"age1…\" or hybrid \"age1pq1…\" recipient (SSH keys, passphrases, plugins and tagged recipients are refused)", ErrUnsupportedRecipient)
}

// SplitSecret splits secret (MinSecretSize..MaxSecretSize bytes of key
// material) into one share per custodian, any p.Threshold of which rebuild
// it. It draws an ephemeral Ed25519 ceremony key, signs each share, checks
// that the shares rebuild the secret, encrypts each to its custodian, and
// clears the ceremony private key and the plaintext shares. It returns the
// sealed shares (in custodian order) and the public record of the split.
// Errors: ErrSplitParams (naming the field), randomness and age errors.
// Safe for concurrent use.
func SplitSecret(secret []byte, p SplitParams) ([]SealedShare, CeremonyPublic, error) {
	recipients, err := p.validate(secret)
	if err != nil {
		return nil, CeremonyPublic{}, err
	}
	rnd := p.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	seed := make([]byte, ed25519.SeedSize)
	if _, err := io.ReadFull(rnd, seed); err != nil {
		return nil, CeremonyPublic{}, fmt.Errorf("ceremony: reading randomness: %w", err)
	}
	priv := ed25519.NewKeyFromSeed(seed)
	clear(seed)
	defer clear(priv)
	shares, err := shareMakeAll(secret, p, priv, rnd)
	if err != nil {
		return nil, CeremonyPublic{}, err
	}
	defer shareClearAll(shares)
	if err := shareSelfCheck(shares, secret); err != nil {
		return nil, CeremonyPublic{}, err
	}
	first := shares[0]
	pub := CeremonyPublic{Version: ShareVersion, CeremonyID: p.CeremonyID, Label: p.Label,
		Threshold: p.Threshold, Total: len(shares), CeremonyKey: bytes.Clone(first.CeremonyKey),
		SecretDigest: bytes.Clone(first.SecretDigest), Shares: make([]ShareRecord, len(shares))}
	sealed := make([]SealedShare, len(shares))
	for i, s := range shares {
		ct, err := shareSeal(s, recipients[i])
		if err != nil {
			return nil, CeremonyPublic{}, fmt.Errorf("ceremony: sealing share %d for %q: %w", s.Index, s.Custodian, err)
		}
		sum := sha256.Sum256(ct)
		sealed[i] = SealedShare{Index: s.Index, Custodian: s.Custodian, Ciphertext: ct, SHA256: bytes.Clone(sum[:])}
		pub.Shares[i] = ShareRecord{Index: s.Index, Custodian: s.Custodian, CiphertextSHA256: bytes.Clone(sum[:])}
	}
	return sealed, pub, nil
}

// validate checks p and the secret's size and parses the recipients.
func (p *SplitParams) validate(secret []byte) ([]age.Recipient, error) {
	if len(secret) < MinSecretSize || len(secret) > MaxSecretSize {
		return nil, fmt.Errorf("%w: secret is %d bytes, want %d to %d", ErrSplitParams, len(secret), MinSecretSize, MaxSecretSize)
	}
	if r := shareCheckText(p.CeremonyID, true); r != "" {
		return nil, fmt.Errorf("%w: ceremony ID %s", ErrSplitParams, r)
	}
	if r := shareCheckText(p.Label, false); r != "" {
		return nil, fmt.Errorf("%w: label %s", ErrSplitParams, r)
	}
	n := len(p.Custodians)
	if n < 2 || n > shamirMaxShares {
		return nil, fmt.Errorf("%w: %d custodians, want 2 to %d", ErrSplitParams, n, shamirMaxShares)
	}
	if p.Threshold < 2 || p.Threshold > n {
		return nil, fmt.Errorf("%w: threshold %d, want 2 to %d (the number of custodians)", ErrSplitParams, p.Threshold, n)
	}
	recipients := make([]age.Recipient, n)
	names, recs := map[string]bool{}, map[string]bool{}
	for i, c := range p.Custodians {
		if r := shareCheckText(c.Name, true); r != "" {
			return nil, fmt.Errorf("%w: custodians[%d].name %s", ErrSplitParams, i, r)
		}
		if names[c.Name] || recs[c.Recipient] {
			return nil, fmt.Errorf("%w: custodians[%d] (%q): name or recipient given twice: one person must not hold two shares", ErrSplitParams, i, c.Name)
		}
		names[c.Name], recs[c.Recipient] = true, true
		r, err := ParseRecipient(c.Recipient)
		if err != nil {
			return nil, fmt.Errorf("%w: custodians[%d].recipient (%q): %w", ErrSplitParams, i, c.Name, err)
		}
		recipients[i] = r
	}
	return recipients, nil
}

// shareCheckText returns why s is not an acceptable ceremony ID, label or
// name ("" if it is): bounded, UTF-8, no control characters.
func shareCheckText(s string, required bool) string {
	switch {
	case s == "" && required:
		return "is required"
	case len(s) > shareMaxText:
		return fmt.Sprintf("is longer than %d bytes", shareMaxText)
	case !utf8.ValidString(s):
		return "is not valid UTF-8"
	case strings.IndexFunc(s, unicode.IsControl) >= 0:
		return "contains control characters"
	}
	return ""
}

// shareSecretDigest is SHA-256 over the domain-separated ceremony ID and
// secret.
func shareSecretDigest(ceremonyID string, secret []byte) []byte {
	h := sha256.New()
	var b []byte
	b = shareAppendField(b, []byte(shareDigestContext))
	b = shareAppendField(b, []byte(ceremonyID))
	b = binary.BigEndian.AppendUint32(b, uint32(len(secret)))
	h.Write(b)
	h.Write(secret)
	return h.Sum(nil)
}

func shareAppendField(b, f []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
	return append(b, f...)
}

// shareSignedMessage is what the ceremony key signs: the context, then the
// version, ceremony ID, label, index, threshold, total, custodian, data,
// secret digest and ceremony key, integers as 4-byte big-endian, strings
// and bytes prefixed with their 4-byte big-endian length. It holds Data:
// callers clear it.
func shareSignedMessage(s *Share) []byte {
	b := make([]byte, 0, 64+len(s.CeremonyID)+len(s.Label)+len(s.Custodian)+len(s.Data)+len(s.SecretDigest)+len(s.CeremonyKey)+64)
	b = shareAppendField(b, []byte(shareSigContext))
	b = binary.BigEndian.AppendUint32(b, uint32(s.Version))
	b = shareAppendField(b, []byte(s.CeremonyID))
	b = shareAppendField(b, []byte(s.Label))
	b = binary.BigEndian.AppendUint32(b, uint32(s.Index))
	b = binary.BigEndian.AppendUint32(b, uint32(s.Threshold))
	b = binary.BigEndian.AppendUint32(b, uint32(s.Total))
	b = shareAppendField(b, []byte(s.Custodian))
	b = shareAppendField(b, s.Data)
	b = shareAppendField(b, s.SecretDigest)
	return shareAppendField(b, s.CeremonyKey)
}

func shareSign(s *Share, priv ed25519.PrivateKey) {
	msg := shareSignedMessage(s)
	s.Signature = ed25519.Sign(priv, msg)
	clear(msg)
}

// shareMakeAll splits secret and builds and signs one Share per custodian.
// p must be valid.
func shareMakeAll(secret []byte, p SplitParams, priv ed25519.PrivateKey, rnd io.Reader) ([]*Share, error) {
	parts, err := shamirSplit(secret, len(p.Custodians), p.Threshold, rnd)
	if err != nil {
		return nil, err
	}
	digest := shareSecretDigest(p.CeremonyID, secret)
	pub := priv.Public().(ed25519.PublicKey)
	shares := make([]*Share, len(parts))
	for i, part := range parts {
		s := &Share{Version: ShareVersion, CeremonyID: p.CeremonyID, Label: p.Label, Index: i + 1,
			Threshold: p.Threshold, Total: len(parts), Custodian: p.Custodians[i].Name, Data: part,
			SecretDigest: bytes.Clone(digest), CeremonyKey: bytes.Clone(pub)}
		shareSign(s, priv)
		shares[i] = s
	}
	return shares, nil
}

func shareClearAll(shares []*Share) {
	for _, s := range shares {
		s.Clear()
	}
}

// shareSelfCheck verifies, before anything is recorded, that the first and
// the last Threshold shares each rebuild secret.
func shareSelfCheck(shares []*Share, secret []byte) error {
	m := shares[0].Threshold
	for _, subset := range [][]*Share{shares[:m], shares[len(shares)-m:]} {
		got, err := CombineShares(subset, nil)
		ok := err == nil && subtle.ConstantTimeCompare(got, secret) == 1
		clear(got)
		if !ok {
			return fmt.Errorf("ceremony: self-check: shares do not rebuild the secret: %v", err)
		}
	}
	return nil
}

// shareSeal encrypts s's JSON to r, armored.
func shareSeal(s *Share, r age.Recipient) ([]byte, error) {
	pt, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	defer clear(pt)
	var buf bytes.Buffer
	aw := armor.NewWriter(&buf)
	w, err := age.Encrypt(aw, r)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(pt); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	if err := aw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// OpenShare decrypts a sealed share (armored or binary age) with the
// custodian's identities (as age.ParseIdentities returns: X25519 and
// hybrid), parses it strictly (exactly the canonical JSON SplitSecret
// writes) and verifies its signature under its own ceremony key. That
// binds the share to the ceremony key it carries, not to a ceremony:
// CombineShares with the ceremony's record does that. Errors:
// ErrShareDecrypt (wrapping age's error), or a *ShareError wrapping
// ErrMalformedShare or ErrBadSignature. The caller must Clear the share.
func OpenShare(sealed []byte, identities ...age.Identity) (*Share, error) {
	if len(identities) == 0 {
		return nil, fmt.Errorf("%w: no identities given", ErrShareDecrypt)
	}
	if len(sealed) > MaxSealedShareSize {
		return nil, fmt.Errorf("%w: sealed share is %d bytes, more than %d", ErrShareDecrypt, len(sealed), MaxSealedShareSize)
	}
	var src io.Reader = bytes.NewReader(sealed)
	if bytes.HasPrefix(bytes.TrimLeft(sealed, " \t\r\n"), []byte(armor.Header)) {
		src = armor.NewReader(src)
	}
	r, err := age.Decrypt(src, identities...)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrShareDecrypt, err)
	}
	buf := make([]byte, shareMaxPlaintext+1)
	defer clear(buf)
	n, err := io.ReadFull(r, buf)
	switch {
	case n == len(buf):
		return nil, fmt.Errorf("%w: plaintext is larger than %d bytes", ErrShareDecrypt, shareMaxPlaintext)
	case err != io.ErrUnexpectedEOF && err != io.EOF:
		return nil, fmt.Errorf("%w: %w", ErrShareDecrypt, err)
	}
	s, err := shareParse(buf[:n])
	if err != nil {
		return nil, err
	}
	if err := shareVerify(s); err != nil {
		s.Clear()
		return nil, err
	}
	return s, nil
}

// shareParse decodes pt, which must be exactly the JSON encoding of the
// Share it decodes to. Errors do not quote pt.
func shareParse(pt []byte) (*Share, error) {
	s := new(Share)
	if err := json.Unmarshal(pt, s); err != nil {
		s.Clear()
		return nil, &ShareError{Reason: "plaintext is not a share's JSON encoding", Err: ErrMalformedShare}
	}
	canon, err := json.Marshal(s)
	ok := err == nil && bytes.Equal(canon, pt)
	clear(canon)
	if !ok {
		s.Clear()
		return nil, shareErr(s, ErrMalformedShare, "plaintext is not in canonical form")
	}
	return s, nil
}

// shareVerify checks s's structure and its signature under its own
// ceremony key.
func shareVerify(s *Share) error {
	if err := shareValidate(s); err != nil {
		return err
	}
	msg := shareSignedMessage(s)
	ok := ed25519.Verify(s.CeremonyKey, msg, s.Signature)
	clear(msg)
	if !ok {
		return shareErr(s, ErrBadSignature, "signature does not verify under its ceremony key: altered or forged")
	}
	return nil
}

func shareValidate(s *Share) error {
	bad := func(format string, args ...any) error { return shareErr(s, ErrMalformedShare, format, args...) }
	switch {
	case s.Version != ShareVersion:
		return bad("version %d, want %d", s.Version, ShareVersion)
	case s.Total < 2 || s.Total > shamirMaxShares || s.Threshold < 2 || s.Threshold > s.Total:
		return bad("threshold %d of %d is out of range", s.Threshold, s.Total)
	case s.Index < 1 || s.Index > s.Total:
		return bad("index out of range 1..%d", s.Total)
	case len(s.Data) < MinSecretSize+1 || len(s.Data) > MaxSecretSize+1:
		return bad("data is %d bytes", len(s.Data))
	case int(s.Data[len(s.Data)-1]) != s.Index:
		return bad("data's x-coordinate is not the index")
	case len(s.SecretDigest) != sha256.Size:
		return bad("secret digest is %d bytes", len(s.SecretDigest))
	case len(s.CeremonyKey) != ed25519.PublicKeySize:
		return bad("ceremony key is %d bytes", len(s.CeremonyKey))
	case len(s.Signature) != ed25519.SignatureSize:
		return bad("signature is %d bytes", len(s.Signature))
	}
	for _, f := range []struct {
		what, v  string
		required bool
	}{{"ceremony ID", s.CeremonyID, true}, {"label", s.Label, false}, {"custodian", s.Custodian, true}} {
		if r := shareCheckText(f.v, f.required); r != "" {
			return bad("%s %s", f.what, r)
		}
	}
	return nil
}
