package ceremony

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"filippo.io/age"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/quorum"
	"github.com/hsmd/hsmd/signing"
)

// Token is the HSM a ceremony works on (*hsm.HSM).
type Token interface {
	ImportRoots(ctx context.Context, version uint32, m *hsm.RootMaterial, kinds ...string) error
	CreateRoots(ctx context.Context, version uint32, kinds ...string) error
	RootVersions(ctx context.Context) (map[string][]uint32, error)
	DestroyRoot(ctx context.Context, kind string, version uint32) error
	SignerVersion(ctx context.Context, alg hsm.SignAlg, version uint32) (crypto.Signer, error)
	KeyInfo(ctx context.Context, label string) (hsm.KeyInfo, error)
}

// Env is what a ceremony runs against. HSM is required.
type Env struct {
	HSM Token
	// TokenLabel names the token in the transcript.
	TokenLabel string
	// Approve checks the quorum-approved request in file for op and spends
	// it (quorum.Policy.Authorize). Nil: no quorum policy is configured, and
	// the ceremonies that need one are refused.
	Approve func(ctx context.Context, file string, op quorum.Operation) (*quorum.Approval, error)
	// Record appends a ceremony step to hsmd's audit log; nil: none.
	Record func(ctx context.Context, s Step) error
	// KDKInUse counts the tenant key versions derived from kdk version v;
	// destroy-root of a kdk is refused unless it is 0 (nil: refused).
	KDKInUse func(ctx context.Context, v uint32) (int, error)
	Now      func() time.Time
	Rand     io.Reader
	// Out receives one line per step as it runs; nil: none.
	Out io.Writer
}

// The root kinds, in the order ceremonies make them.
var allKinds = []string{hsm.KindKDK, hsm.KindWrap, hsm.KindSigEd25519, hsm.KindSigP256}

// kinds are the root kinds f creates or restores.
func (f *File) kinds() []string {
	switch f.Ceremony {
	case KindRotateKDK:
		return []string{hsm.KindKDK}
	case KindRotateSigning:
		return []string{hsm.KindSigEd25519, hsm.KindSigP256}
	case KindDestroyRoot:
		return []string{f.Key}
	}
	return allKinds
}

// Operation is what quorum approvers approve for f: its kind, ID and the
// SHA-256 of the ceremony file's bytes, so an approval covers exactly this
// file; for a restore also the SHA-256 of its inputs (the transcript and
// the share files), so that no other material can be swapped in.
func (f *File) Operation() (quorum.Operation, bool) {
	var kind string
	switch f.Ceremony {
	case KindRestore:
		kind = quorum.KindRestore
	case KindRotateKDK:
		kind = quorum.KindRotateKDK
	case KindDestroyRoot:
		kind = quorum.KindDestroyRoot
	default:
		return quorum.Operation{}, false
	}
	params := map[string]string{"ceremony": f.ID, "file_sha256": hex.EncodeToString(f.digest[:])}
	if f.inputs != nil {
		params["inputs_sha256"] = hex.EncodeToString(f.inputs)
	}
	return quorum.Operation{Kind: kind, Params: params}, true
}

// Plan checks that f can run on env's token (its labels are free, its
// outputs do not exist, what it needs is there) and returns the steps it
// would take. It changes nothing.
func Plan(ctx context.Context, f *File, env *Env) ([]string, error) {
	if err := f.preflight(ctx, env); err != nil {
		return nil, err
	}
	v := f.Version
	var steps []string
	add := func(format string, a ...any) { steps = append(steps, fmt.Sprintf(format, a...)) }
	if op, ok := f.Operation(); ok {
		add("check the quorum approval %s of %s (digest sha256:%x) and mark it spent", f.path(f.Approvals), op, op.Digest())
	}
	switch f.Ceremony {
	case KindRootInit, KindRotateKDK:
		labels := labelsOf(f.kinds(), v)
		if c := f.Custody; c != nil {
			add("draw the root key material in this process (%s)", strings.Join(labels, ", "))
			add("split it %d-of-%d with Shamir's scheme over GF(256); sign each share with a one-time ceremony key", c.Threshold, len(c.Custodians))
			for i, cu := range c.Custodians {
				add("encrypt share %d to custodian %s (%s) and write it to %s", i+1, cu.Name, recipientKind(cu.Recipient), f.path(cu.Output))
			}
			add("import %s into the token: sensitive, not extractable, not modifiable, not copyable", strings.Join(labels, ", "))
			add("self-test them against the material (HMAC known answer, AES-GCM round trip, sign and verify); then clear the material")
		} else {
			add("generate %s inside the token (no backup): sensitive, not extractable", strings.Join(labels, ", "))
			add("self-test them (HMAC, AES-GCM round trip, sign and verify)")
		}
	case KindRestore:
		add("verify the transcript %s of the ceremony that made the shares", f.path(f.Expect))
		for i, s := range f.Shares {
			add("decrypt share %d (%s) with identity %s and check it against the transcript", i+1, f.path(s.File), f.path(s.Identity))
		}
		add("rebuild the root key material from the shares (refused below the threshold, a wrong share named)")
		add("import the roots at version %d into the token and self-test them; check their public keys against the transcript", v)
	case KindRotateSigning:
		add("generate %s inside the token and self-test them", strings.Join(labelsOf(f.kinds(), v), ", "))
	case KindDestroyRoot:
		if f.Key == hsm.KindKDK {
			add("check that no tenant key version derives from %s", hsm.KeyLabel(f.Key, v))
		}
		add("destroy %s on the token", hsm.KeyLabel(f.Key, v))
	}
	add("sign the transcript with the token's newest Ed25519 and ECDSA P-256 keys and write it to %s", f.path(f.Transcript))
	return steps, nil
}

func recipientKind(r string) string {
	if strings.HasPrefix(r, "age1pq1") {
		return "age mlkem768x25519, post-quantum hybrid"
	}
	return "age X25519"
}

func labelsOf(kinds []string, v uint32) []string {
	out := make([]string, len(kinds))
	for i, k := range kinds {
		out[i] = hsm.KeyLabel(k, v)
	}
	return out
}

// ErrRefused: the ceremony cannot run as written (a label in use, an
// output that exists, a missing approval policy, a root still in use).
var ErrRefused = errors.New("ceremony: refused")

func refused(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, a...))
}

// preflight checks what Plan and Run both need, changing nothing.
func (f *File) preflight(ctx context.Context, env *Env) error {
	if env == nil || env.HSM == nil {
		return errors.New("ceremony: no HSM")
	}
	for _, o := range f.Outputs() {
		if _, err := os.Lstat(o); err == nil {
			return refused("%s exists: a ceremony never overwrites an output (rerun with new output names, or keep the earlier result)", o)
		}
		// The output's directory must take a file now, not after the keys
		// are made.
		tmp, err := os.CreateTemp(filepath.Dir(o), ".ceremony-check-*")
		if err != nil {
			return refused("cannot write %s: %v", o, err)
		}
		tmp.Close()
		os.Remove(tmp.Name())
	}
	if _, ok := f.Operation(); ok && env.Approve == nil {
		return refused("a %s ceremony needs a quorum approval, and no quorum policy is configured", f.Ceremony)
	}
	have, err := env.HSM.RootVersions(ctx)
	if err != nil {
		return err
	}
	switch f.Ceremony {
	case KindDestroyRoot:
		if !slices.Contains(have[f.Key], f.Version) {
			return refused("%s is not on the token", hsm.KeyLabel(f.Key, f.Version))
		}
		if len(have[f.Key]) < 2 {
			return refused("%s is the only %s version: a root in use is never destroyed", hsm.KeyLabel(f.Key, f.Version), f.Key)
		}
	default:
		for _, k := range f.kinds() {
			if slices.Contains(have[k], f.Version) {
				return refused("%s already exists on the token: labels are never reused", hsm.KeyLabel(k, f.Version))
			}
		}
		if f.Ceremony == KindRootInit {
			for _, k := range allKinds {
				if len(have[k]) > 0 {
					return refused("the token already holds %s keys: %s needs a token without roots", k, f.Ceremony)
				}
			}
		}
	}
	return nil
}

// runner carries one run's transcript.
type runner struct {
	f   *File
	env *Env
	t   Transcript
	// kinds are the root kinds the run made: f.kinds(), or for a restore
	// those its transcript records.
	kinds []string
}

func (r *runner) now() time.Time {
	if r.env.Now != nil {
		return r.env.Now().UTC()
	}
	return time.Now().UTC()
}

func (r *runner) rand() io.Reader {
	if r.env.Rand != nil {
		return r.env.Rand
	}
	return rand.Reader
}

// step records a step in the transcript, the audit log and the output.
func (r *runner) step(ctx context.Context, action, format string, a ...any) error {
	s := Step{Time: r.now(), Action: action, Detail: fmt.Sprintf(format, a...)}
	r.t.Steps = append(r.t.Steps, s)
	return r.emit(ctx, s)
}

// emit sends a step to the output and the audit log.
func (r *runner) emit(ctx context.Context, s Step) error {
	action := s.Action
	if r.env.Out != nil {
		fmt.Fprintf(r.env.Out, "%s  %s: %s\n", s.Time.Format(time.RFC3339), s.Action, s.Detail)
	}
	if r.env.Record != nil {
		if err := r.env.Record(ctx, s); err != nil {
			return fmt.Errorf("ceremony: the audit log refused step %q: %w", action, err)
		}
	}
	return nil
}

// Run performs the ceremony f on env and returns its transcript, also
// written to f.Transcript. A step that fails stops the ceremony; what it
// created is undone where it can be (the error says what remains).
func Run(ctx context.Context, f *File, env *Env) (*Transcript, error) {
	if err := f.preflight(ctx, env); err != nil {
		return nil, err
	}
	r := &runner{f: f, env: env, kinds: f.kinds()}
	r.t = Transcript{Ceremony: f.Ceremony, ID: f.ID, Token: env.TokenLabel, Started: r.now()}
	if err := r.step(ctx, "start", "ceremony %s %s (file sha256:%x)", f.Ceremony, f.ID, f.digest); err != nil {
		return nil, err
	}
	if op, ok := f.Operation(); ok {
		a, err := env.Approve(ctx, f.path(f.Approvals), op)
		if err != nil {
			return nil, fmt.Errorf("ceremony: quorum approval: %w", err)
		}
		r.t.Approval = &ApprovalRecord{Digest: fmt.Sprintf("sha256:%x", op.Digest()), Nonce: a.Nonce, Approvers: a.Approvers}
		if err := r.step(ctx, "approved", "%s by %s", op, strings.Join(a.Approvers, ", ")); err != nil {
			return nil, err
		}
	}
	var err error
	switch f.Ceremony {
	case KindRootInit, KindRotateKDK:
		err = r.createOrImport(ctx)
	case KindRestore:
		err = r.restore(ctx)
	case KindRotateSigning:
		err = r.generate(ctx)
	case KindDestroyRoot:
		err = r.destroy(ctx)
	}
	if err != nil {
		return nil, err
	}
	if err := r.finish(ctx); err != nil {
		return nil, err
	}
	return &r.t, nil
}

// createOrImport makes the roots of root-init or rotate-kdk: inside the
// HSM, or drawn here and split among the custodians.
func (r *runner) createOrImport(ctx context.Context) error {
	f := r.f
	if f.Custody == nil {
		return r.generate(ctx)
	}
	m, err := hsm.NewRootMaterial(r.rand())
	if err != nil {
		return err
	}
	defer m.Clear()
	secret := m.Marshal()
	defer clear(secret)
	cs := make([]Custodian, len(f.Custody.Custodians))
	for i, c := range f.Custody.Custodians {
		cs[i] = Custodian{Name: c.Name, Recipient: c.Recipient}
	}
	sealed, pub, err := SplitSecret(secret, SplitParams{
		CeremonyID: f.ID, Label: fmt.Sprintf("hsmd roots v%d (%s)", f.Version, strings.Join(f.kinds(), ",")),
		Threshold: f.Custody.Threshold, Custodians: cs, Rand: r.rand(),
	})
	if err != nil {
		return err
	}
	if err := r.step(ctx, "split", "root key material split %d-of-%d, ceremony key %x", pub.Threshold, pub.Total, pub.CeremonyKey); err != nil {
		return err
	}
	var written []string
	undo := func() {
		for _, p := range written {
			os.Remove(p)
		}
	}
	for i, s := range sealed {
		out := f.path(f.Custody.Custodians[i].Output)
		if err := writeNew(out, s.Ciphertext); err != nil {
			undo()
			return err
		}
		written = append(written, out)
		if err := r.step(ctx, "share", "share %d for %s written to %s (sha256:%x)", s.Index, s.Custodian, out, s.SHA256); err != nil {
			undo()
			return err
		}
	}
	if err := r.env.HSM.ImportRoots(ctx, f.Version, m, f.kinds()...); err != nil {
		undo()
		return fmt.Errorf("ceremony: import into the token (the share files were removed): %w", err)
	}
	r.t.Custody = &pub
	return r.recordKeys(ctx, "imported", "HMAC known answer, AES-GCM round trip, sign/verify against the material")
}

// generate makes f's kinds inside the HSM.
func (r *runner) generate(ctx context.Context) error {
	if err := r.env.HSM.CreateRoots(ctx, r.f.Version, r.f.kinds()...); err != nil {
		return err
	}
	return r.recordKeys(ctx, "generated", "HMAC, AES-GCM round trip, sign/verify")
}

// recordKeys checks the protective attributes of f's new keys and records
// them, with the signing keys' public halves.
func (r *runner) recordKeys(ctx context.Context, origin, selfTest string) error {
	for _, k := range r.kinds {
		label := hsm.KeyLabel(k, r.f.Version)
		ki, err := r.env.HSM.KeyInfo(ctx, label)
		if err != nil {
			return err
		}
		if !ki.Sensitive || ki.Extractable {
			return fmt.Errorf("ceremony: %s reads CKA_SENSITIVE=%v CKA_EXTRACTABLE=%v", label, ki.Sensitive, ki.Extractable)
		}
		rec := KeyRecord{Label: label, Kind: k, Version: r.f.Version, Origin: origin, SelfTest: selfTest}
		if alg, ok := signAlg(k); ok {
			s, err := r.env.HSM.SignerVersion(ctx, alg, r.f.Version)
			if err != nil {
				return err
			}
			if rec.Public, err = publicBytes(s.Public()); err != nil {
				return err
			}
		}
		r.t.Keys = append(r.t.Keys, rec)
		if err := r.step(ctx, "key", "%s %s (sensitive, not extractable; self-tested: %s)", label, origin, selfTest); err != nil {
			return err
		}
	}
	return nil
}

func signAlg(kind string) (hsm.SignAlg, bool) {
	switch kind {
	case hsm.KindSigEd25519:
		return hsm.Ed25519, true
	case hsm.KindSigP256:
		return hsm.ECDSAP256, true
	}
	return 0, false
}

func publicBytes(pub crypto.PublicKey) ([]byte, error) {
	switch p := pub.(type) {
	case ed25519.PublicKey:
		return bytes.Clone(p), nil
	case *ecdsa.PublicKey:
		return p.Bytes()
	}
	return nil, fmt.Errorf("ceremony: unexpected public key %T", pub)
}

// restore rebuilds the roots from the custodians' shares.
func (r *runner) restore(ctx context.Context) error {
	f := r.f
	tb, err := os.ReadFile(f.path(f.Expect))
	if err != nil {
		return fmt.Errorf("ceremony: %w", err)
	}
	// What is read must be what was approved (the inputs' digests at Load).
	inputs := sha256.New()
	sum := sha256.Sum256(tb)
	inputs.Write(sum[:])
	// Self-certified here; the rebuilt keys' public halves must then match
	// the ones it records (it was signed by the keys being restored).
	orig, _, err := VerifyTranscript(tb, nil)
	if err != nil {
		return err
	}
	if orig.Custody == nil {
		return refused("the transcript %s records no custody shares", f.Expect)
	}
	if err := r.step(ctx, "expect", "transcript of %s %s: %d-of-%d, ceremony key %x", orig.Ceremony, orig.ID,
		orig.Custody.Threshold, orig.Custody.Total, orig.Custody.CeremonyKey); err != nil {
		return err
	}
	var shares []*Share
	defer func() {
		for _, s := range shares {
			s.Clear()
		}
	}()
	for i, in := range f.Shares {
		sealed, err := os.ReadFile(f.path(in.File))
		if err != nil {
			return fmt.Errorf("ceremony: shares[%d]: %w", i, err)
		}
		sum := sha256.Sum256(sealed)
		inputs.Write(sum[:])
		ids, err := readIdentities(f.path(in.Identity))
		if err != nil {
			return fmt.Errorf("ceremony: shares[%d].identity: %w", i, err)
		}
		s, err := OpenShare(sealed, ids...)
		if err != nil {
			return fmt.Errorf("ceremony: shares[%d] (%s): %w", i, in.File, err)
		}
		shares = append(shares, s)
		if err := orig.Custody.CheckSealed(s.Index, sealed); err != nil {
			return fmt.Errorf("ceremony: shares[%d] (%s): %w", i, in.File, err)
		}
		if err := r.step(ctx, "share", "share %d of %s opened and authenticated", s.Index, s.Custodian); err != nil {
			return err
		}
	}
	if !bytes.Equal(inputs.Sum(nil), f.inputs) {
		return refused("the transcript or a share file changed since the ceremony file was loaded (and approved)")
	}
	secret, err := CombineShares(shares, orig.Custody)
	if err != nil {
		return err
	}
	defer clear(secret)
	m, err := hsm.ParseRootMaterial(secret)
	if err != nil {
		return err
	}
	defer m.Clear()
	kinds := make([]string, 0, len(orig.Keys))
	for _, k := range orig.Keys {
		if k.Version != f.Version {
			return refused("the shares hold version %d of %s, the ceremony file restores version %d", k.Version, k.Kind, f.Version)
		}
		kinds = append(kinds, k.Kind)
	}
	if len(kinds) == 0 {
		return refused("the transcript %s records no keys", f.Expect)
	}
	if err := r.env.HSM.ImportRoots(ctx, f.Version, m, kinds...); err != nil {
		return err
	}
	r.kinds = kinds
	if err := r.recordKeys(ctx, "imported", "HMAC known answer, AES-GCM round trip, sign/verify against the rebuilt material"); err != nil {
		return err
	}
	// The rebuilt signing keys must be those that signed the transcript.
	for _, k := range orig.Keys {
		for _, got := range r.t.Keys {
			if got.Kind == k.Kind && k.Public != nil && !bytes.Equal(got.Public, k.Public) {
				for _, kind := range kinds {
					r.env.HSM.DestroyRoot(ctx, kind, f.Version) //nolint:errcheck // best effort; the error below says what happened
				}
				return fmt.Errorf("ceremony: the rebuilt %s public key differs from the transcript's: the shares are not that ceremony's", k.Kind)
			}
		}
	}
	return nil
}

func readIdentities(path string) ([]age.Identity, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	return age.ParseIdentities(io.LimitReader(fh, 64<<10))
}

// destroy removes a retired root version.
func (r *runner) destroy(ctx context.Context) error {
	f := r.f
	if f.Key == hsm.KindKDK {
		if r.env.KDKInUse == nil {
			return refused("cannot tell whether tenant key versions use %s", hsm.KeyLabel(f.Key, f.Version))
		}
		n, err := r.env.KDKInUse(ctx, f.Version)
		if err != nil {
			return err
		}
		if n > 0 {
			return refused("%d tenant key versions still derive from %s: rotate and destroy them first", n, hsm.KeyLabel(f.Key, f.Version))
		}
	}
	if err := r.env.HSM.DestroyRoot(ctx, f.Key, f.Version); err != nil {
		return err
	}
	r.t.Keys = append(r.t.Keys, KeyRecord{Label: hsm.KeyLabel(f.Key, f.Version), Kind: f.Key, Version: f.Version, Origin: "destroyed"})
	return r.step(ctx, "destroy", "%s destroyed", hsm.KeyLabel(f.Key, f.Version))
}

// finish signs the transcript with the newest signing keys and writes it.
func (r *runner) finish(ctx context.Context) error {
	have, err := r.env.HSM.RootVersions(ctx)
	if err != nil {
		return err
	}
	var signers []note.Signer
	for _, k := range []string{hsm.KindSigEd25519, hsm.KindSigP256} {
		vs := have[k]
		if len(vs) == 0 {
			return fmt.Errorf("ceremony: no %s key to sign the transcript", k)
		}
		alg, _ := signAlg(k)
		cs, err := r.env.HSM.SignerVersion(ctx, alg, vs[len(vs)-1])
		if err != nil {
			return err
		}
		ns, err := signing.NewNoteSigner(TranscriptSignerName, cs)
		if err != nil {
			return err
		}
		signers = append(signers, ns)
	}
	// The finish step is in the transcript, and reported once it is
	// written.
	fin := Step{Time: r.now(), Action: "finish", Detail: fmt.Sprintf("transcript signed and written to %s", r.f.path(r.f.Transcript))}
	r.t.Steps = append(r.t.Steps, fin)
	r.t.Finished = fin.Time
	b, err := SignTranscript(&r.t, signers...)
	if err != nil {
		return err
	}
	if err := writeNew(r.f.path(r.f.Transcript), b); err != nil {
		return fmt.Errorf("%w (the ceremony's keys are on the token; its steps are in the audit log)", err)
	}
	return r.emit(ctx, fin)
}

// fileDigest is the SHA-256 of a ceremony file's bytes.
func fileDigest(b []byte) [32]byte { return sha256.Sum256(b) }
