package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/transparency-dev/formats/log"
	"github.com/transparency-dev/tessera/api/layout"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/audit"
)

func init() {
	register("audit", command{summary: "the audit log, offline: verify, tail, prove, keys", run: runAudit})
}

// auditUsage lists the subcommands of `hsmd audit`.
const auditUsage = `usage: hsmd audit <subcommand> (--config FILE | --dev | --data-dir DIR) [flags]

subcommands (offline, on the files in <data-dir>/audit):
  verify [--key VKEY ...] [--require-all=false]  verify every entry and checkpoint
  tail [-f] [-n N] [--from I] [--poll D]         print entries as JSON lines (default the last 10)
  prove N [--key VKEY ...]                       print the inclusion proof of entry N (JSON)
  keys                                           print the checkpoint verifier keys`

// auditDirName is the audit log's directory under the data directory.
const auditDirName = "audit"

// auditTailDefault is how many entries `hsmd audit tail` prints by default.
const auditTailDefault = 10

var auditSubcommands = map[string]func(context.Context, *cliEnv, []string) error{
	"verify": runAuditVerify,
	"tail":   runAuditTail,
	"prove":  runAuditProve,
	"keys":   runAuditKeys,
}

// runAudit dispatches `hsmd audit <subcommand>`. The subcommands read the
// log's files and never write them, so they run while hsmd serves.
func runAudit(ctx context.Context, env *cliEnv, args []string) error {
	audit.QuietTessera()
	if len(args) == 0 {
		return &usageError{auditUsage}
	}
	sub, ok := auditSubcommands[args[0]]
	if !ok {
		return &usageError{fmt.Sprintf("unknown audit subcommand %q\n%s", args[0], auditUsage)}
	}
	return sub(ctx, env, args[1:])
}

// auditFlags are the flags every audit subcommand takes: where the data
// directory is, and for some, the trusted verifier keys.
type auditFlags struct {
	config, dataDir string
	dev             bool
	keys            keyList
}

// keyList is a repeatable --key flag (verifier keys).
type keyList []string

func (k *keyList) String() string     { return strings.Join(*k, ",") }
func (k *keyList) Set(v string) error { *k = append(*k, v); return nil }

func (a *auditFlags) register(fs *flag.FlagSet, withKeys bool) {
	fs.StringVar(&a.config, "config", "", "configuration file (YAML): its data_dir")
	fs.BoolVar(&a.dev, "dev", false, "development profile: data directory "+DefaultDataDir)
	fs.StringVar(&a.dataDir, "data-dir", "", "data directory (overrides the configuration's)")
	if withKeys {
		fs.Var(&a.keys, "key", "trusted checkpoint verifier key (C2SP signed-note vkey), repeatable; default the audit dir's "+audit.VerifiersFile+" file")
	}
}

// newAuditFlagSet returns the flag set of `hsmd audit <name>`.
func newAuditFlagSet(env *cliEnv, name string, a *auditFlags, withKeys bool) *flag.FlagSet {
	fs := flag.NewFlagSet("hsmd audit "+name, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	a.register(fs, withKeys)
	return fs
}

// parseAuditFlags parses args and refuses positional arguments beyond
// maxArgs.
func parseAuditFlags(fs *flag.FlagSet, args []string, maxArgs int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &usageError{err.Error()}
	}
	if fs.NArg() > maxArgs {
		return &usageError{fmt.Sprintf("%s: unexpected argument %q", fs.Name(), fs.Arg(maxArgs))}
	}
	return nil
}

// auditDir returns <data-dir>/audit. Unlike the daemon's commands it never
// creates anything: --data-dir alone is enough, since the log is only read.
func (a *auditFlags) auditDir() (string, error) {
	dataDir := a.dataDir
	if dataDir == "" && a.config != "" {
		c, err := loadConfig(a.config)
		if err != nil {
			return "", err
		}
		c.applyDefaults()
		dataDir = c.DataDir
	}
	if dataDir == "" {
		if !a.dev {
			return "", &usageError{"one of --config FILE, --dev or --data-dir DIR is required"}
		}
		dataDir = DefaultDataDir
	}
	dir := filepath.Join(dataDir, auditDirName)
	if _, err := os.Stat(filepath.Join(dir, audit.TreeDir)); err != nil {
		return "", withHint(fmt.Errorf("audit: no audit log in %s: %w", dir, err),
			"check --data-dir (or data_dir in the configuration); hsmd creates the log at its first start")
	}
	return dir, nil
}

// verifierKeys returns the keys given with --key or, without any, those of
// the audit dir's verifiers file, after a warning on stderr: the data
// directory vouching for itself proves internal consistency only.
func (a *auditFlags) verifierKeys(env *cliEnv, dir string) ([]string, error) {
	if len(a.keys) > 0 {
		return a.keys, nil
	}
	keys, err := audit.ReadVerifiers(dir)
	if err != nil {
		return nil, withHint(err, "pass the trusted keys with --key VKEY (one per key)")
	}
	if len(keys) == 0 {
		return nil, withHint(fmt.Errorf("audit: %s lists no verifier key", filepath.Join(dir, audit.VerifiersFile)),
			"pass the trusted keys with --key VKEY (one per key)")
	}
	fmt.Fprintf(env.stderr, "hsmd: warning: verifier keys read from %s, in the data directory itself: this proves the log's internal consistency only; pass --key with keys obtained out of band to prove it is the log hsmd signed\n",
		filepath.Join(dir, audit.VerifiersFile))
	return keys, nil
}

// verifiers parses the keys verifierKeys selects.
func (a *auditFlags) verifiers(env *cliEnv, dir string) ([]note.Verifier, error) {
	keys, err := a.verifierKeys(env, dir)
	if err != nil {
		return nil, err
	}
	vs, err := audit.ParseVerifiers(keys)
	if err != nil && len(a.keys) > 0 {
		return nil, &usageError{"--key: " + err.Error()}
	}
	return vs, err
}

func runAuditVerify(ctx context.Context, env *cliEnv, args []string) error {
	var a auditFlags
	fs := newAuditFlagSet(env, "verify", &a, true)
	requireAll := fs.Bool("require-all", true, "every checkpoint must carry a valid signature from EVERY key; =false: from at least one key alone")
	if err := parseAuditFlags(fs, args, 0); err != nil {
		return err
	}
	dir, err := a.auditDir()
	if err != nil {
		return err
	}
	vs, err := a.verifiers(env, dir)
	if err != nil {
		return err
	}
	var rep *audit.Report
	if *requireAll {
		rep, err = audit.Verify(ctx, dir, vs)
	} else {
		rep, err = verifyAnyKey(ctx, env, dir, vs)
	}
	if err != nil {
		var ve *audit.VerifyError
		if errors.As(err, &ve) {
			return withHint(err, "the audit log does not verify: keep a copy of "+dir+" as evidence before hsmd writes to it again")
		}
		return err
	}
	printAuditReport(env.stdout, dir, rep, len(vs), *requireAll)
	return nil
}

// verifyAnyKey verifies the log with each key alone and succeeds if one
// key verifies it all, telling on stderr which keys did not.
func verifyAnyKey(ctx context.Context, env *cliEnv, dir string, vs []note.Verifier) (*audit.Report, error) {
	var rep *audit.Report
	var first error
	for _, v := range vs {
		r, err := audit.Verify(ctx, dir, []note.Verifier{v})
		if err != nil {
			fmt.Fprintf(env.stderr, "hsmd: warning: key %s+%08x: %v\n", v.Name(), v.KeyHash(), err)
			if first == nil {
				first = err
			}
			continue
		}
		if rep == nil {
			rep = r
		}
	}
	if rep == nil {
		return nil, first
	}
	return rep, nil
}

func printAuditReport(w io.Writer, dir string, rep *audit.Report, keys int, all bool) {
	fmt.Fprintf(w, "audit log %s: verified\n", dir)
	fmt.Fprintf(w, "entries:     %d\n", rep.Size)
	fmt.Fprintf(w, "checkpoints: %d\n", rep.Checkpoints)
	fmt.Fprintf(w, "size:        %d\n", rep.Size)
	fmt.Fprintf(w, "root hash:   %s\n", base64.StdEncoding.EncodeToString(rep.Root))
	if all {
		fmt.Fprintf(w, "signatures:  every checkpoint signed by each of %d keys\n", keys)
	} else {
		fmt.Fprintf(w, "signatures:  every checkpoint signed by at least one of %d keys (--require-all=false)\n", keys)
	}
	if rep.Unpublished > 0 {
		fmt.Fprintf(w, "unpublished: %d archived checkpoints newer than the published one, verified (a crash between archiving and publishing, or hsmd writing the log now)\n", rep.Unpublished)
	}
	if rep.Uncovered > 0 {
		fmt.Fprintf(w, "uncovered:   %d entries after the newest checkpoint, not verified (hsmd publishes a checkpoint covering them at its next start)\n", rep.Uncovered)
	}
}

// auditSize returns the size of the log's published checkpoint, whose
// signatures are not checked here (tail only prints; verify checks).
func auditSize(dir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, audit.TreeDir, layout.CheckpointPath))
	if err != nil {
		return 0, fmt.Errorf("audit: read the checkpoint: %w", err)
	}
	var cp log.Checkpoint
	if _, err := cp.Unmarshal(b); err != nil {
		return 0, fmt.Errorf("audit: malformed checkpoint: %w", err)
	}
	return cp.Size, nil
}

// auditTailOpts are the flags of `hsmd audit tail`.
type auditTailOpts struct {
	follow bool
	n      uint64
	from   uint64
	poll   time.Duration
	nSet   bool // -n given
	fromOK bool // --from given
}

func runAuditTail(ctx context.Context, env *cliEnv, args []string) error {
	var a auditFlags
	var o auditTailOpts
	fs := newAuditFlagSet(env, "tail", &a, false)
	fs.BoolVar(&o.follow, "f", false, "keep following: print new entries as checkpoints cover them, until interrupted")
	fs.Uint64Var(&o.n, "n", auditTailDefault, "print the last N entries (with --from: at most N from I; with -f: before following)")
	fs.Uint64Var(&o.from, "from", 0, "print the entries from index I")
	fs.DurationVar(&o.poll, "poll", 500*time.Millisecond, "with -f, how often to look for new entries")
	if err := parseAuditFlags(fs, args, 0); err != nil {
		return err
	}
	fs.Visit(func(f *flag.Flag) { o.nSet, o.fromOK = o.nSet || f.Name == "n", o.fromOK || f.Name == "from" })
	if o.poll <= 0 {
		return &usageError{"--poll must be positive"}
	}
	dir, err := a.auditDir()
	if err != nil {
		return err
	}
	size, err := auditSize(dir)
	if err != nil {
		return err
	}
	from, to := o.window(size)
	w := bufio.NewWriter(env.stdout)
	next, err := printAuditEntries(ctx, w, dir, from, to)
	if err != nil || !o.follow {
		return errors.Join(err, w.Flush())
	}
	return followAudit(ctx, w, dir, next, o.poll)
}

// window returns the range of entries to print from a log of size entries.
func (o *auditTailOpts) window(size uint64) (from, to uint64) {
	if !o.fromOK {
		return size - min(o.n, size), size
	}
	if o.nSet && o.n < size-min(o.from, size) {
		return o.from, o.from + o.n
	}
	return o.from, size
}

// indexedEntry is an entry as the audit commands print it: the stored
// JSON object with its leaf index first.
type indexedEntry struct {
	Index uint64 `json:"index"`
	*audit.Entry
}

// printAuditEntries prints entries [from, to) as JSON lines and returns
// the index after the last one printed. It stops at to itself: with
// tessera v1.0.4, audit.Entries yields past to when from > 0
// (client.EntryBundles passes from+N to layout.Range as the count).
func printAuditEntries(ctx context.Context, w io.Writer, dir string, from, to uint64) (uint64, error) {
	i := from
	for e, err := range audit.Entries(ctx, dir, from, to) {
		if i >= to {
			break
		}
		if err != nil {
			return i, fmt.Errorf("audit: entry %d: %w", i, err)
		}
		b, err := json.Marshal(indexedEntry{e.Seq, e})
		if err != nil {
			return i, err
		}
		if _, err := fmt.Fprintf(w, "%s\n", b); err != nil {
			return i, err
		}
		i++
	}
	return i, nil
}

// followAudit prints, every poll, the entries the newest checkpoint covers
// from index next on, until ctx is done (then it returns nil).
func followAudit(ctx context.Context, w *bufio.Writer, dir string, next uint64, poll time.Duration) error {
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		if err := w.Flush(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		size, err := auditSize(dir)
		if err != nil {
			return err
		}
		if size < next {
			return fmt.Errorf("audit: the log shrank from %d to %d entries while followed", next, size)
		}
		if next, err = printAuditEntries(ctx, w, dir, next, size); err != nil {
			if ctx.Err() != nil {
				err = nil // interrupted while reading
			}
			return errors.Join(err, w.Flush())
		}
	}
}

func runAuditProve(ctx context.Context, env *cliEnv, args []string) error {
	var a auditFlags
	fs := newAuditFlagSet(env, "prove", &a, true)
	// The index may come before the flags or after them.
	var index string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		index, args = args[0], args[1:]
	}
	if err := parseAuditFlags(fs, args, 1); err != nil {
		return err
	}
	if index == "" {
		index = fs.Arg(0)
	} else if fs.NArg() > 0 {
		return &usageError{fmt.Sprintf("hsmd audit prove: unexpected argument %q", fs.Arg(0))}
	}
	n, err := strconv.ParseUint(index, 10, 64)
	if err != nil {
		return &usageError{"usage: hsmd audit prove N [flags]: N is an entry index (0, 1, ...)"}
	}
	dir, err := a.auditDir()
	if err != nil {
		return err
	}
	vs, err := a.verifiers(env, dir)
	if err != nil {
		return err
	}
	p, err := audit.Prove(ctx, dir, n, vs)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(env.stdout, "%s\n", b)
	return err
}

// auditKeyTypes names the C2SP signed-note signature types hsmd uses.
var auditKeyTypes = map[byte]string{
	0x01: "Ed25519",
	0x02: "ECDSA P-256",
	0x04: "Ed25519 cosignature/v1",
	0x06: "ML-DSA-44 cosignature/v1",
}

func runAuditKeys(_ context.Context, env *cliEnv, args []string) error {
	var a auditFlags
	fs := newAuditFlagSet(env, "keys", &a, false)
	if err := parseAuditFlags(fs, args, 0); err != nil {
		return err
	}
	dir, err := a.auditDir()
	if err != nil {
		return err
	}
	keys, err := audit.ReadVerifiers(dir)
	if err != nil {
		return err
	}
	if _, err := audit.ParseVerifiers(keys); err != nil {
		return err
	}
	w := bufio.NewWriter(env.stdout)
	for _, k := range keys {
		fmt.Fprintf(w, "# %s\n%s\n", describeVerifierKey(k), k)
	}
	return w.Flush()
}

// describeVerifierKey names the type, name and key hash of a verifier key
// "name+hash+base64(type||key)" (base64 may hold '+' itself).
func describeVerifierKey(vkey string) string {
	name, rest, _ := strings.Cut(vkey, "+")
	hash, key, _ := strings.Cut(rest, "+")
	typ := "unknown type"
	if b, err := base64.StdEncoding.DecodeString(key); err == nil && len(b) > 0 {
		if t, ok := auditKeyTypes[b[0]]; ok {
			typ = fmt.Sprintf("%s (0x%02x)", t, b[0])
		} else {
			typ = fmt.Sprintf("unknown type 0x%02x", b[0])
		}
	}
	return fmt.Sprintf("%s, name %s, key hash %s", typ, name, hash)
}
