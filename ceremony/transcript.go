package ceremony

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/signing"
)

// transcriptHeader is the first line of a transcript's signed text.
const transcriptHeader = "hsmd ceremony transcript v1"

// TranscriptSignerName is the key name in transcript signatures.
const TranscriptSignerName = "hsmd-ceremony"

// Transcript records what a ceremony did. It is the text of a signed note
// (the header line, then one line of JSON), signed by the HSM's Ed25519 and
// ECDSA P-256 keys of the newest version after the ceremony.
type Transcript struct {
	Ceremony string    `json:"ceremony"`
	ID       string    `json:"id"`
	Token    string    `json:"token"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Steps    []Step    `json:"steps"`
	// Keys are the root keys created, imported or destroyed.
	Keys []KeyRecord `json:"keys,omitempty"`
	// Custody is the public record of the shares (root-init and rotate-kdk
	// with custody): a restore checks its shares against it.
	Custody *CeremonyPublic `json:"custody,omitempty"`
	// Approval names the quorum approval the ceremony executed.
	Approval *ApprovalRecord `json:"approval,omitempty"`
	// Signers are the verifier keys of the transcript's signatures.
	Signers []string `json:"signers"`
}

// Step is one step of a ceremony, in order.
type Step struct {
	Time   time.Time `json:"time"`
	Action string    `json:"action"`
	Detail string    `json:"detail,omitempty"`
}

// KeyRecord is one root key a ceremony touched.
type KeyRecord struct {
	Label   string `json:"label"`
	Kind    string `json:"kind"`
	Version uint32 `json:"version"`
	// Origin: "generated" (inside the HSM, no backup), "imported" (drawn
	// in the ceremony and split among custodians, or restored), or
	// "destroyed".
	Origin string `json:"origin"`
	// Public is the public key of a signing key (base64 of its standard
	// encoding: Ed25519 32 bytes, P-256 uncompressed point).
	Public []byte `json:"public,omitempty"`
	// SelfTest says what was checked before the key was recorded.
	SelfTest string `json:"self_test,omitempty"`
}

// ApprovalRecord is the quorum approval a ceremony executed.
type ApprovalRecord struct {
	Digest    string   `json:"digest"`
	Nonce     string   `json:"nonce"`
	Approvers []string `json:"approvers"`
}

// marshalText is the transcript's note text.
func (t *Transcript) marshalText() (string, error) {
	b, err := json.Marshal(t)
	if err != nil {
		return "", err
	}
	return transcriptHeader + "\n" + string(b) + "\n", nil
}

// SignTranscript returns the transcript as a signed note, signed by every
// signer (their verifier keys are recorded in it first).
func SignTranscript(t *Transcript, signers ...note.Signer) ([]byte, error) {
	if len(signers) == 0 {
		return nil, errors.New("ceremony: no transcript signer")
	}
	t.Signers = t.Signers[:0]
	for _, s := range signers {
		v, ok := s.(interface{ VerifierKey() string })
		if !ok {
			return nil, fmt.Errorf("ceremony: transcript signer %s cannot tell its verifier key", s.Name())
		}
		t.Signers = append(t.Signers, v.VerifierKey())
	}
	text, err := t.marshalText()
	if err != nil {
		return nil, err
	}
	return note.Sign(&note.Note{Text: text}, signers...)
}

// ErrTranscript: a transcript is malformed, or its signatures do not
// verify.
var ErrTranscript = errors.New("ceremony: transcript does not verify")

// VerifyTranscript checks a signed transcript. With vkeys (the verifier
// keys the operator trusts, for example printed by the ceremony that made
// the keys), every one of them must have signed it; without, the keys it
// names itself must all have signed it, which proves only that it is
// unchanged since signed by those keys (selfCertified is then true).
func VerifyTranscript(b []byte, vkeys []string) (t *Transcript, selfCertified bool, err error) {
	if len(b) > MaxFileSize {
		return nil, false, fmt.Errorf("%w: over %d bytes", ErrTranscript, MaxFileSize)
	}
	text, _, ok := bytes.Cut(b, []byte("\n\n"))
	if !ok {
		return nil, false, fmt.Errorf("%w: not a signed note", ErrTranscript)
	}
	header, body, ok := strings.Cut(string(text), "\n")
	if !ok || header != transcriptHeader || strings.Contains(body, "\n") {
		return nil, false, fmt.Errorf("%w: not an hsmd ceremony transcript", ErrTranscript)
	}
	dec := json.NewDecoder(strings.NewReader(body))
	dec.DisallowUnknownFields()
	t = new(Transcript)
	if err := dec.Decode(t); err != nil {
		return nil, false, fmt.Errorf("%w: %v", ErrTranscript, err)
	}
	if canon, err := t.marshalText(); err != nil || canon != string(text)+"\n" {
		return nil, false, fmt.Errorf("%w: not in canonical form", ErrTranscript)
	}
	if len(vkeys) == 0 {
		vkeys, selfCertified = t.Signers, true
	}
	if len(vkeys) == 0 {
		return nil, false, fmt.Errorf("%w: no signer", ErrTranscript)
	}
	vs := make([]note.Verifier, len(vkeys))
	for i, k := range vkeys {
		if vs[i], err = tnote.NewVerifier(k); err != nil {
			return nil, false, fmt.Errorf("%w: verifier key %q: %v", ErrTranscript, k, err)
		}
	}
	if err := signing.Verify(b, vs...); err != nil {
		return nil, false, fmt.Errorf("%w: %v", ErrTranscript, err)
	}
	if err := signing.CheckCanonical(b); err != nil {
		return nil, false, fmt.Errorf("%w: %v", ErrTranscript, err)
	}
	return t, selfCertified, nil
}

// writeNew writes b to path durably, refusing to replace an existing file
// (the check and the creation are one atomic link).
func writeNew(path string, b []byte) error {
	err := fsutil.WriteFileNew(path, b, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("ceremony: %s exists: a ceremony never overwrites an output", path)
	}
	if err != nil {
		return fmt.Errorf("ceremony: write %s: %w", path, err)
	}
	return nil
}
