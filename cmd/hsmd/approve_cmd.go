package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/quorum"
)

func init() {
	register("approve", command{summary: "quorum approval of destructive operations: sign a request; new, keygen, merge, verify", run: runApprove})
}

const approveUsage = `usage:
  hsmd approve REQUEST_FILE --key SKEY_FILE [--out FILE]
  hsmd approve new --kind KIND [--param k=v ...] [--expires 24h] --out FILE
  hsmd approve keygen --name NAME [--mldsa] --out SKEY_FILE
  hsmd approve merge --out FILE REQUEST_FILE...
  hsmd approve verify REQUEST_FILE --policy POLICY_FILE

(a request file named new, keygen, merge or verify: write it as ./new)`

const maxSkeyFile = 16 << 10

// runApprove dispatches `hsmd approve`: a first argument naming a
// subcommand runs it, anything else is a request file to sign.
func runApprove(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) > 0 {
		switch args[0] {
		case "new":
			return runApproveNew(env, args[1:])
		case "keygen":
			return runApproveKeygen(env, args[1:])
		case "merge":
			return runApproveMerge(env, args[1:])
		case "verify":
			return runApproveVerify(env, args[1:])
		}
	}
	return runApproveSign(env, args)
}

func newApproveFlagSet(env *cliEnv, name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "%s\n\nflags:\n", approveUsage)
		fs.PrintDefaults()
	}
	return fs
}

func approveUsageError(msg string) error {
	return withHint(&usageError{msg: msg}, "run `hsmd approve -h` for usage")
}

// runApproveSign implements `hsmd approve REQUEST_FILE --key SKEY_FILE`.
func runApproveSign(env *cliEnv, args []string) error {
	fs := newApproveFlagSet(env, "approve")
	keyFile := fs.String("key", "", "operator private key `file`, from hsmd approve keygen (required)")
	out := fs.String("out", "", "write the signed request to this new `file` instead of replacing REQUEST_FILE")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *keyFile == "" {
		return approveUsageError("approve: want one REQUEST_FILE and --key")
	}
	b, err := readFileCapped(pos[0], quorum.MaxNoteSize)
	if err != nil {
		return err
	}
	req, sigs, err := quorum.ParseNote(b)
	if err != nil {
		return fmt.Errorf("%s: %w", pos[0], err)
	}
	fmt.Fprintln(env.stderr, "approving:")
	printRequest(env.stderr, req, sigs)
	if !time.Now().Before(req.Expires) {
		return withHint(fmt.Errorf("%s: %w", pos[0], quorum.ErrExpired), "ask for a new request: hsmd approve new")
	}
	signer, err := loadSigner(env, *keyFile)
	if err != nil {
		return err
	}
	signed, err := quorum.Approve(b, signer)
	if err != nil {
		return err
	}
	if *out == "" {
		err = fsutil.WriteFileAtomic(pos[0], signed, 0o644)
	} else {
		err = writeNewFile(*out, signed, 0o644)
	}
	if err != nil {
		return fmt.Errorf("writing the signed request: %w", err)
	}
	dest := *out
	if dest == "" {
		dest = pos[0]
	}
	fmt.Fprintf(env.stderr, "approved as %s: wrote %s\n", signer.Name(), dest)
	return nil
}

// loadSigner reads an operator private key file. Its errors never quote
// the file's content; a file others can read gets a warning.
func loadSigner(env *cliEnv, path string) (note.Signer, error) {
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
		fmt.Fprintf(env.stderr, "hsmd: warning: %s is readable by other users (mode %04o); chmod 600 it\n", path, fi.Mode().Perm())
	}
	b, err := readFileCapped(path, maxSkeyFile)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	s, err := quorum.NewSigner(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, withHint(fmt.Errorf("%s: %w", path, err), "make an operator key with: hsmd approve keygen --name NAME --out FILE")
	}
	return s, nil
}

// printRequest shows what a request asks for, and who signed it so far
// (unverified: only `verify` checks signatures).
func printRequest(w io.Writer, r *quorum.Request, sigs []note.Signature) {
	d := r.Digest()
	fmt.Fprintf(w, "  kind:    %s\n", r.Op.Kind)
	for _, k := range slices.Sorted(maps.Keys(r.Op.Params)) {
		fmt.Fprintf(w, "  param:   %s = %s\n", k, r.Op.Params[k])
	}
	fmt.Fprintf(w, "  digest:  sha256:%x\n", d[:])
	fmt.Fprintf(w, "  nonce:   %s\n", r.Nonce)
	fmt.Fprintf(w, "  created: %s\n", r.Created.Format(time.RFC3339))
	fmt.Fprintf(w, "  expires: %s (in %v)\n", r.Expires.Format(time.RFC3339), time.Until(r.Expires).Round(time.Second))
	if len(sigs) > 0 {
		names := make([]string, len(sigs))
		for i, s := range sigs {
			names[i] = s.Name
		}
		fmt.Fprintf(w, "  signed:  %s (not verified here)\n", strings.Join(names, ", "))
	}
}

// runApproveNew implements `hsmd approve new`.
func runApproveNew(env *cliEnv, args []string) error {
	fs := newApproveFlagSet(env, "approve new")
	kind := fs.String("kind", "", "operation `kind`: "+strings.Join(quorum.Kinds, ", ")+" (required)")
	params := contextFlag{}
	fs.Var(params, "param", "operation parameter `k=v` (repeatable)")
	expires := fs.Duration("expires", 24*time.Hour, "the request expires this long from now")
	out := fs.String("out", "", "request `file` to create (required)")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || *kind == "" || *out == "" {
		return approveUsageError("approve new: want --kind and --out, and no arguments")
	}
	if *expires <= 0 {
		return approveUsageError("approve new: --expires must be positive")
	}
	op := quorum.Operation{Kind: *kind, Params: map[string]string(params)}
	if err := op.Validate(); err != nil {
		return err
	}
	r := quorum.NewRequest(op, time.Now().Add(*expires), nil)
	text, err := r.MarshalText()
	if err != nil {
		return err
	}
	if err := writeNewFile(*out, text, 0o644); err != nil {
		return fmt.Errorf("writing the request: %w", err)
	}
	fmt.Fprintf(env.stderr, "wrote request %s:\n", *out)
	printRequest(env.stderr, r, nil)
	fmt.Fprintf(env.stderr, "each operator runs: hsmd approve %s --key THEIR_KEY\n", *out)
	return nil
}

// runApproveKeygen implements `hsmd approve keygen`.
func runApproveKeygen(env *cliEnv, args []string) error {
	fs := newApproveFlagSet(env, "approve keygen")
	name := fs.String("name", "", "operator `name`, as registered in the policy (required)")
	mldsa := fs.Bool("mldsa", false, "make an ML-DSA-44 key (post-quantum) instead of Ed25519")
	out := fs.String("out", "", "private key `file` to create, mode 0600 (required)")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || *name == "" || *out == "" {
		return approveUsageError("approve keygen: want --name and --out, and no arguments")
	}
	typ := quorum.KeyEd25519
	if *mldsa {
		typ = quorum.KeyMLDSA44
	}
	skey, vkey, err := quorum.GenerateKey(nil, *name, typ)
	if err != nil {
		return err
	}
	if err := writeNewFile(*out, []byte(skey+"\n"), 0o600); err != nil {
		return fmt.Errorf("writing the private key: %w", err)
	}
	fmt.Fprintln(env.stdout, vkey)
	fmt.Fprintf(env.stderr, "wrote the %s private key of %s to %s: keep it secret\nregister the verifier key (printed on stdout) in the policy:\n  operators:\n    - name: %s\n      key: %s\n",
		typ, *name, *out, *name, vkey)
	return nil
}

// runApproveMerge implements `hsmd approve merge`.
func runApproveMerge(env *cliEnv, args []string) error {
	fs := newApproveFlagSet(env, "approve merge")
	out := fs.String("out", "", "merged request `file` to create (required)")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 || *out == "" {
		return approveUsageError("approve merge: want --out and at least one REQUEST_FILE")
	}
	var notes [][]byte
	for _, p := range pos {
		b, err := readFileCapped(p, quorum.MaxNoteSize)
		if err != nil {
			return err
		}
		notes = append(notes, b)
	}
	merged, err := quorum.Merge(notes...)
	if err != nil {
		return err
	}
	if err := writeNewFile(*out, merged, 0o644); err != nil {
		return fmt.Errorf("writing the merged request: %w", err)
	}
	fmt.Fprintf(env.stderr, "merged %d files into %s\n", len(pos), *out)
	return nil
}

// runApproveVerify implements `hsmd approve verify`: it checks the
// signatures against the policy for the operation the request names. It
// does not spend the nonce; the service that runs the operation does.
func runApproveVerify(env *cliEnv, args []string) error {
	fs := newApproveFlagSet(env, "approve verify")
	policyFile := fs.String("policy", "", "quorum policy `file` (YAML: threshold, max_validity, operators) (required)")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *policyFile == "" {
		return approveUsageError("approve verify: want one REQUEST_FILE and --policy")
	}
	p, err := quorum.LoadPolicy(*policyFile)
	if err != nil {
		return err
	}
	b, err := readFileCapped(pos[0], quorum.MaxNoteSize)
	if err != nil {
		return err
	}
	req, _, err := quorum.ParseNote(b)
	if err != nil {
		return fmt.Errorf("%s: %w", pos[0], err)
	}
	fmt.Fprintln(env.stdout, "request:")
	printRequest(env.stdout, req, nil)
	a, err := p.Verify(b, req.Op, time.Now())
	var tf *quorum.TooFewApprovalsError
	if errors.As(err, &tf) {
		fmt.Fprintf(env.stdout, "approved by: %s\nthreshold:   %d of %d: NOT met\n", listOrNone(tf.Approvers), tf.Valid, tf.Needed)
		return err
	}
	if err != nil {
		return fmt.Errorf("%s: %w", pos[0], err)
	}
	fmt.Fprintf(env.stdout, "approved by: %s\n", listOrNone(a.Approvers))
	if len(a.Ignored) > 0 {
		fmt.Fprintf(env.stdout, "ignored:     %s (not in the policy)\n", strings.Join(a.Ignored, ", "))
	}
	fmt.Fprintf(env.stdout, "threshold:   %d of %d: met\n", len(a.Approvers), p.Threshold)
	return nil
}

func listOrNone(names []string) string {
	if len(names) == 0 {
		return "(none)"
	}
	return strings.Join(names, ", ")
}

// readFileCapped reads path, refusing files over limit bytes.
func readFileCapped(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is over %d bytes", path, limit)
	}
	return b, nil
}

// writeNewFile writes path durably, refusing to replace an existing file.
func writeNewFile(path string, data []byte, mode os.FileMode) error {
	err := fsutil.WriteFileNew(path, data, mode)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s already exists; not replacing it", path)
	}
	return err
}
