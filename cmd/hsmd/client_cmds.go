package main

// The client commands: tenants, encrypt and decrypt (keys is in
// keys_cmds.go). They talk to a running hsmd through package client.

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hsmd/hsmd/client"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const (
	// defaultClientAddr is the dev socket of `make run` (hsmd serve --dev --data-dir ./var).
	defaultClientAddr = "unix://./var/hsmd.sock"
	// maxCLIInput is the most encrypt and decrypt read from stdin: 64 MiB.
	// Bigger inputs are refused before more than maxCLIInput+1 bytes are read.
	maxCLIInput = 64 << 20
	// cliMsgSize leaves room over maxCLIInput for framing and ciphertext
	// overhead in one gRPC message.
	cliMsgSize = maxCLIInput + 1<<20

	connectHint = "is hsmd running? start it with make run"
)

func init() {
	register("tenants", command{summary: "create, list or show tenants", run: runTenants})
	register("encrypt", command{summary: "encrypt stdin to stdout, or a file of any size (--file), under a tenant's key", run: runEncrypt})
	register("decrypt", command{summary: "decrypt stdin (binary or text form) to stdout, or a file (--file)", run: runDecrypt})
}

// connFlags are the flags every client command takes.
type connFlags struct {
	addr    string
	timeout time.Duration
	tls     tlsFlags
}

// newClientFlagSet returns a flag set for a client command with the
// connection flags defined; usage is the synopsis line after "usage: ".
func newClientFlagSet(env *cliEnv, name, usage string) (*flag.FlagSet, *connFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(env.stderr) // parseClientFlags silences parse errors: run prints them
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s\n\nflags:\n", usage)
		fs.PrintDefaults()
	}
	cf := &connFlags{}
	addr := env.getenv("HSMD_ADDR")
	if addr == "" {
		addr = defaultClientAddr
	}
	fs.StringVar(&cf.addr, "addr", addr, "hsmd address: unix:///abs/path, unix:rel/path or host:port (env HSMD_ADDR)")
	fs.DurationVar(&cf.timeout, "timeout", time.Minute, "give up after this long")
	cf.tls.register(fs, env)
	return fs, cf
}

// parseClientFlags parses args, allowing flags after positional arguments
// (`hsmd tenants create NAME --addr X`), and returns the positional ones.
// A parse error is a usage error, printed once by run; -h prints the flag
// set's usage to its output and returns flag.ErrHelp.
func parseClientFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	defer fs.SetOutput(out)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(out)
				fs.Usage()
				return nil, err
			}
			return nil, withHint(&usageError{msg: err.Error()}, fmt.Sprintf("run `hsmd %s -h` for its flags", fs.Name()))
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// dial returns a client of hsmd. It does not connect yet, so it fails only
// on a bad --addr (a usage error).
func (cf *connFlags) dial(ctx context.Context) (*client.Client, error) {
	opts, err := cf.tls.options(cf.addr)
	if err != nil {
		return nil, err
	}
	c, err := client.Dial(ctx, cf.addr, append(opts, client.WithMaxRecvMsgSize(cliMsgSize), client.WithMaxSendMsgSize(cliMsgSize))...)
	if err != nil {
		return nil, &usageError{msg: "--addr: " + err.Error()}
	}
	return c, nil
}

// withTimeout applies --timeout to ctx.
func (cf *connFlags) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if cf.timeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, cf.timeout)
}

// clientRPCError turns an error of a call to hsmd into a CLI error: the server's
// message and code, with a hint when hsmd could not be reached.
func clientRPCError(op string, err error) error {
	var se interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &se) {
		return fmt.Errorf("%s: %w", op, err)
	}
	st := se.GRPCStatus()
	out := fmt.Errorf("%s: %s (%s)", op, st.Message(), st.Code())
	if st.Code() == codes.Unavailable {
		return withHint(out, unavailableHint(st.Message()))
	}
	return out
}

// contextFlag is a repeatable --context k=v flag.
type contextFlag map[string]string

func (c contextFlag) String() string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(c)) {
		parts = append(parts, k+"="+c[k])
	}
	return strings.Join(parts, ",")
}

// Set adds one k=v pair. The key must be non-empty and not given before;
// the value may be empty. Errors name the key, never the value.
func (c contextFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return errors.New("want key=value")
	}
	if _, dup := c[k]; dup {
		return fmt.Errorf("context key %q given twice", k)
	}
	c[k] = v
	return nil
}

// readStdinCapped reads all of r, refusing more than maxCLIInput bytes.
func readStdinCapped(r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxCLIInput+1))
	if err != nil {
		return nil, fmt.Errorf("reading stdin: %w", err)
	}
	if len(b) > maxCLIInput {
		return nil, fmt.Errorf("input is over the %d MiB limit of this command", maxCLIInput>>20)
	}
	return b, nil
}

func runEncrypt(ctx context.Context, env *cliEnv, args []string) error {
	fs, cf := newClientFlagSet(env, "encrypt", "hsmd encrypt --tenant T [--context k=v ...] [--text] < plaintext > ciphertext\n"+
		"       hsmd encrypt --tenant T [--context k=v ...] --file IN [--out OUT]")
	tenant := fs.String("tenant", "", "tenant `name` (required)")
	aad := contextFlag{}
	fs.Var(aad, "context", "`k=v` bound to the ciphertext; decryption needs the same set (repeatable)")
	text := fs.Bool("text", false, "write the text form (hsmd:v1:…) and a newline instead of binary")
	var ff fileFlags
	ff.register(fs, "encrypt")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return &usageError{msg: "encrypt reads stdin and takes no arguments"}
	}
	if *tenant == "" {
		return &usageError{msg: "encrypt: --tenant is required"}
	}
	if ff.set() {
		return ff.encryptFile(ctx, env, cf, *tenant, aad, *text)
	}
	c, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	pt, err := readStdinCapped(env.stdin)
	if err != nil {
		return err
	}
	ctx, cancel := cf.withTimeout(ctx)
	defer cancel()
	ct, err := c.EncryptOne(ctx, *tenant, client.Item{Plaintext: pt, Context: aad})
	clear(pt)
	if err != nil {
		return clientRPCError("encrypt", err)
	}
	if *text {
		_, err = fmt.Fprintln(env.stdout, client.ToText(ct))
	} else {
		_, err = env.stdout.Write(ct)
	}
	return err
}

func runDecrypt(ctx context.Context, env *cliEnv, args []string) error {
	fs, cf := newClientFlagSet(env, "decrypt", "hsmd decrypt [--tenant T] [--context k=v ...] < ciphertext > plaintext\n"+
		"       hsmd decrypt [--tenant T] [--context k=v ...] --file IN [--out OUT]")
	tenant := fs.String("tenant", "", "expected tenant `name`; a ciphertext of another tenant fails")
	aad := contextFlag{}
	fs.Var(aad, "context", "`k=v` the ciphertext was bound to (repeatable)")
	var ff fileFlags
	ff.register(fs, "decrypt")
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return &usageError{msg: "decrypt reads stdin and takes no arguments"}
	}
	if ff.set() {
		return ff.decryptFile(ctx, env, cf, *tenant, aad)
	}
	c, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	in, err := readStdinCapped(env.stdin)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(in)) == 0 {
		return errors.New("no ciphertext on stdin")
	}
	ct := in // binary: used as is, whitespace included
	if trimmed := bytes.TrimSpace(in); bytes.HasPrefix(trimmed, []byte(client.TextPrefix)) {
		if ct, err = client.FromText(string(trimmed)); err != nil {
			return errors.New("input is not a valid hsmd text-form ciphertext")
		}
	}
	ctx, cancel := cf.withTimeout(ctx)
	defer cancel()
	pt, err := c.DecryptOne(ctx, *tenant, client.CiphertextItem{Ciphertext: ct, Context: aad})
	var ie *client.ItemError
	switch {
	case err == nil:
	case errors.Is(err, client.ErrDecrypt):
		return errors.New("decryption failed")
	case errors.Is(err, client.ErrMalformed):
		return errors.New("input is not an hsmd ciphertext")
	case errors.Is(err, client.ErrKeyDisabled), errors.Is(err, client.ErrKeyDestroyed), errors.Is(err, client.ErrKeyRetired):
		return keyStateError(err, *tenant)
	case errors.As(err, &ie):
		return fmt.Errorf("decrypt: %s (%s)", ie.Message, ie.Code)
	default:
		return clientRPCError("decrypt", err)
	}
	_, err = env.stdout.Write(pt)
	clear(pt)
	return err
}

// keyStateError is the CLI error of an item whose key version refuses to
// decrypt: what happened, and what can be done about it.
func keyStateError(err error, tenant string) error {
	if tenant == "" {
		tenant = "TENANT"
	}
	switch {
	case errors.Is(err, client.ErrKeyDisabled):
		return withHint(errors.New("the key version is disabled"),
			fmt.Sprintf("`hsmd keys show %s` shows its state; `hsmd keys enable` (after `hsmd keys cancel-destroy` if its destruction is scheduled) lets it decrypt again", tenant))
	case errors.Is(err, client.ErrKeyDestroyed):
		return withHint(errors.New("the key version is destroyed"), "nothing it encrypted can be decrypted again")
	default:
		return withHint(errors.New("the key version is retired: it is below the tenant's minimum decryption version"),
			fmt.Sprintf("`hsmd keys policy %s --min-decryption-version N` changes the minimum", tenant))
	}
}

const tenantsUsage = `usage: hsmd tenants <subcommand> [flags]

subcommands:
  create NAME   create a tenant with key version 1; prints it as list does
  list          print every tenant, one per line: name, id, current version
  get NAME      print a tenant and its key versions
  shred NAME --confirm NAME
                destroy every key version of the tenant: nothing it encrypted
                can be decrypted again. There is no undo.`

func runTenants(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) == 0 {
		return &usageError{msg: "tenants needs a subcommand\n" + tenantsUsage}
	}
	sub, args := args[0], args[1:]
	var nargs int
	switch sub {
	case "create", "get", "shred":
		nargs = 1
	case "list":
	case "help", "-h", "--help":
		fmt.Fprintln(env.stdout, tenantsUsage)
		return nil
	default:
		return &usageError{msg: fmt.Sprintf("unknown tenants subcommand %q\n%s", sub, tenantsUsage)}
	}
	synopsis := "hsmd tenants " + sub
	if nargs == 1 {
		synopsis += " NAME"
	}
	var confirm, approval string
	if sub == "shred" {
		synopsis += " --confirm NAME [--approval FILE]"
	}
	fs, cf := newClientFlagSet(env, "tenants "+sub, synopsis+" [flags]")
	if sub == "shred" {
		fs.StringVar(&confirm, "confirm", "", "the tenant `name` again: shredding cannot be undone")
		fs.StringVar(&approval, "approval", "", "quorum-approved request `file` (hsmd approve), when the server has a quorum policy")
	}
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != nargs {
		return &usageError{msg: "usage: " + synopsis}
	}
	if sub == "shred" && confirm != pos[0] {
		return withHint(&usageError{msg: "tenants shred: --confirm must repeat the tenant name"},
			fmt.Sprintf("shredding cannot be undone: nothing %s encrypted can be decrypted again", pos[0]))
	}
	c, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := cf.withTimeout(ctx)
	defer cancel()
	switch sub {
	case "create":
		t, err := c.CreateTenant(ctx, pos[0])
		if err != nil {
			return clientRPCError("create tenant", err)
		}
		return printTenantLines(env.stdout, []client.Tenant{t})
	case "get":
		t, err := c.GetTenant(ctx, pos[0])
		if err != nil {
			return clientRPCError("get tenant", err)
		}
		return printTenant(env.stdout, t)
	case "shred":
		var opts []client.CallOption
		if approval != "" {
			b, err := os.ReadFile(approval)
			if err != nil {
				return err
			}
			opts = append(opts, client.WithApproval(b))
		}
		if err := c.ShredTenant(ctx, pos[0], opts...); err != nil {
			return clientRPCError("shred tenant", err)
		}
		_, err := fmt.Fprintf(env.stdout, "hsmd: shredded tenant %s: its data can no longer be decrypted\n", pos[0])
		return err
	default:
		ts, err := c.ListTenants(ctx)
		if err != nil {
			return clientRPCError("list tenants", err)
		}
		return printTenantLines(env.stdout, ts)
	}
}

// printTenantLines prints one tenant per line: name, id, current version,
// in aligned columns without a header.
func printTenantLines(w io.Writer, ts []client.Tenant) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range ts {
		fmt.Fprintf(tw, "%s\t%s\t%d\n", t.Name, t.ID, t.CurrentVersion)
	}
	return tw.Flush()
}

func printTenant(w io.Writer, t client.Tenant) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\n", t.Name)
	fmt.Fprintf(tw, "id:\t%s\n", t.ID)
	fmt.Fprintf(tw, "current version:\t%d\n", t.CurrentVersion)
	fmt.Fprintf(tw, "created:\t%s\n", formatTenantTime(t.CreateTime))
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "versions:")
	for _, v := range t.Versions {
		fmt.Fprintf(tw, "  %d\tkdk %d\t%s\t%s\n", v.Version, v.KDKVersion, v.State, formatTenantTime(v.CreateTime))
	}
	return tw.Flush()
}

func formatTenantTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
