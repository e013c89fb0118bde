// Package ceremony runs hsmd's operator key ceremonies: one strict YAML
// file per ceremony (unknown keys are errors naming their YAML path), a
// plan that shows every step and changes nothing, and a run that performs
// the steps, self-tests what it created before recording it, never reuses a
// label or overwrites an output file, and ends with a transcript signed by
// the HSM.
//
// Kinds: root-init (root keys created inside the HSM, or drawn here, split
// M-of-N with Shamir's scheme among custodians whose age recipients
// encrypt their shares, then imported non-extractable), restore (M shares
// rebuild the roots onto a fresh token), rotate-kdk and rotate-signing (new
// root versions) and destroy-root (a retired version nothing references).
package ceremony

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
)

// Ceremony kinds.
const (
	KindRootInit      = "root-init"
	KindRestore       = "restore"
	KindRotateKDK     = "rotate-kdk"
	KindRotateSigning = "rotate-signing"
	KindDestroyRoot   = "destroy-root"
)

// MaxFileSize bounds a ceremony file.
const MaxFileSize = 1 << 20

// File is one ceremony file.
type File struct {
	// Ceremony is the kind: root-init, restore, rotate-kdk,
	// rotate-signing or destroy-root.
	Ceremony string `yaml:"ceremony"`
	// ID names this ceremony uniquely (letters, digits, '.', '_', '-'); it
	// is written into every share and the transcript.
	ID string `yaml:"id"`
	// Version is the root version created, restored or destroyed.
	Version uint32 `yaml:"version"`
	// Key is the root kind destroy-root removes (kdk, sig-ed25519,
	// sig-p256; wrap versions are kept: blobs sealed under them have no
	// re-seal ceremony yet).
	Key string `yaml:"key"`
	// Custody, for root-init and rotate-kdk, draws the key material in the
	// ceremony and splits it among custodians; without it the keys are
	// made inside the HSM and have no backup.
	Custody *Custody `yaml:"custody"`
	// Shares, for restore: at least the threshold of custodians' shares.
	Shares []ShareInput `yaml:"shares"`
	// Expect, for restore: the transcript of the root-init ceremony whose
	// shares these are (its record authenticates them).
	Expect string `yaml:"expect"`
	// Approvals is the quorum-approved request file, for the operations
	// that need one (restore, rotate-kdk, destroy-root).
	Approvals string `yaml:"approvals"`
	// Transcript is where the signed transcript is written (must not
	// exist).
	Transcript string `yaml:"transcript"`

	dir    string   // the file's directory: relative paths are relative to it
	digest [32]byte // SHA-256 of the file's bytes
	// inputs is, for restore, the SHA-256 over the SHA-256 of the expect
	// transcript and of each share file, in order: the approval covers
	// them, not only their names.
	inputs []byte
}

// Custody is the M-of-N split of root key material.
type Custody struct {
	Threshold  int             `yaml:"threshold"`
	Custodians []CustodianSpec `yaml:"custodians"`
}

// CustodianSpec is one share holder: their age recipient (X25519 "age1…"
// or post-quantum hybrid "age1pq1…") and where their encrypted share is
// written (must not exist).
type CustodianSpec struct {
	Name      string `yaml:"name"`
	Recipient string `yaml:"recipient"`
	Output    string `yaml:"output"`
}

// ShareInput is one custodian's share at restore: the encrypted share file
// and the file of the age identity that decrypts it (the custodian's,
// brought to the ceremony).
type ShareInput struct {
	File     string `yaml:"file"`
	Identity string `yaml:"identity"`
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Load reads and validates a ceremony file.
func Load(path string) (*File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("ceremony: %w", err)
	}
	if fi.Size() > MaxFileSize {
		return nil, fmt.Errorf("ceremony: %s is over %d bytes", path, MaxFileSize)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ceremony: %w", err)
	}
	return Parse(b, filepath.Dir(path))
}

// Parse decodes and validates a ceremony file whose relative paths are
// relative to dir.
func Parse(b []byte, dir string) (*File, error) {
	var f File
	if err := decodeStrict(b, &f); err != nil {
		return nil, err
	}
	f.dir, f.digest = dir, fileDigest(b)
	if err := f.validate(); err != nil {
		return nil, err
	}
	if f.Ceremony == KindRestore {
		h := sha256.New()
		paths := []struct{ yaml, p string }{{"expect", f.Expect}}
		for i, s := range f.Shares {
			paths = append(paths, struct{ yaml, p string }{fmt.Sprintf("shares[%d].file", i), s.File})
		}
		for _, in := range paths {
			b, err := os.ReadFile(f.path(in.p))
			if err != nil {
				return nil, pathErr(in.yaml, "%v", err)
			}
			sum := sha256.Sum256(b)
			h.Write(sum[:])
		}
		f.inputs = h.Sum(nil)
	}
	return &f, nil
}

func pathErr(path, format string, a ...any) error {
	return &PathError{Path: path, Msg: fmt.Sprintf(format, a...)}
}

// validate names the YAML path of the first problem.
func (f *File) validate() error {
	if !idPattern.MatchString(f.ID) {
		return pathErr("id", "required: 1 to 128 letters, digits, '.', '_' or '-'")
	}
	if f.Transcript == "" {
		return pathErr("transcript", "required: the file the signed transcript is written to")
	}
	none := func(name string, set bool) error {
		if set {
			return pathErr(name, "not used by a %s ceremony", f.Ceremony)
		}
		return nil
	}
	var errs []error
	switch f.Ceremony {
	case KindRootInit, KindRotateKDK:
		if f.Ceremony == KindRootInit && f.Version == 0 {
			f.Version = 1
		}
		if f.Ceremony == KindRotateKDK && f.Version < 2 {
			return pathErr("version", "required: the new kdk version (2 or more)")
		}
		if f.Custody != nil {
			if err := f.Custody.validate(); err != nil {
				return err
			}
		}
		errs = append(errs, none("shares", f.Shares != nil), none("expect", f.Expect != ""), none("key", f.Key != ""))
		if f.Ceremony == KindRotateKDK && f.Approvals == "" {
			return pathErr("approvals", "required: rotate-kdk needs a quorum-approved request")
		}
	case KindRestore:
		if f.Version == 0 {
			f.Version = 1
		}
		if len(f.Shares) == 0 {
			return pathErr("shares", "required: the custodians' shares")
		}
		for i, s := range f.Shares {
			if s.File == "" || s.Identity == "" {
				return pathErr(fmt.Sprintf("shares[%d]", i), "file and identity are required")
			}
		}
		if f.Expect == "" {
			return pathErr("expect", "required: the transcript of the ceremony that made the shares")
		}
		if f.Approvals == "" {
			return pathErr("approvals", "required: restore needs a quorum-approved request")
		}
		errs = append(errs, none("custody", f.Custody != nil), none("key", f.Key != ""))
	case KindRotateSigning:
		if f.Version < 2 {
			return pathErr("version", "required: the new signing key version (2 or more)")
		}
		errs = append(errs, none("custody", f.Custody != nil), none("shares", f.Shares != nil), none("expect", f.Expect != ""), none("key", f.Key != ""))
	case KindDestroyRoot:
		switch f.Key {
		case "kdk", "sig-ed25519", "sig-p256":
		case "wrap":
			return pathErr("key", "wrap versions are not destroyed: blobs sealed under them (audit keys) would no longer open")
		default:
			return pathErr("key", "required: kdk, sig-ed25519 or sig-p256")
		}
		if f.Version == 0 {
			return pathErr("version", "required: the root version to destroy")
		}
		if f.Approvals == "" {
			return pathErr("approvals", "required: destroy-root needs a quorum-approved request")
		}
		errs = append(errs, none("custody", f.Custody != nil), none("shares", f.Shares != nil), none("expect", f.Expect != ""))
	case "":
		return pathErr("ceremony", "required: root-init, restore, rotate-kdk, rotate-signing or destroy-root")
	default:
		return pathErr("ceremony", "unknown kind %q (root-init, restore, rotate-kdk, rotate-signing, destroy-root)", f.Ceremony)
	}
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func (c *Custody) validate() error {
	n := len(c.Custodians)
	if n < 2 || n > 255 {
		return pathErr("custody.custodians", "2 to 255 custodians, not %d", n)
	}
	if c.Threshold < 2 || c.Threshold > n {
		return pathErr("custody.threshold", "must be 2..%d (the number of custodians), not %d", n, c.Threshold)
	}
	names, outs := map[string]bool{}, map[string]bool{}
	for i, cu := range c.Custodians {
		p := fmt.Sprintf("custody.custodians[%d]", i)
		switch {
		case cu.Name == "" || names[cu.Name]:
			return pathErr(p+".name", "required and unique")
		case cu.Output == "" || outs[cu.Output]:
			return pathErr(p+".output", "required and unique: the file this custodian's share is written to")
		case cu.Recipient == "":
			return pathErr(p+".recipient", "required: the custodian's age recipient")
		}
		if _, err := ParseRecipient(cu.Recipient); err != nil {
			return pathErr(p+".recipient", "%v", err)
		}
		names[cu.Name], outs[cu.Output] = true, true
	}
	return nil
}

// path resolves p relative to the ceremony file's directory.
func (f *File) path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(f.dir, p)
}

// Outputs lists the files the ceremony writes: none may exist beforehand.
func (f *File) Outputs() []string {
	out := []string{f.path(f.Transcript)}
	if f.Custody != nil {
		for _, c := range f.Custody.Custodians {
			out = append(out, f.path(c.Output))
		}
	}
	return out
}
