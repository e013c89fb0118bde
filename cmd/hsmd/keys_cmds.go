package main

// The keys command: rotation, policy and the life cycle of a tenant's key
// versions, through package client.

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hsmd/hsmd/client"
)

func init() {
	register("keys", command{summary: "rotate, show and manage a tenant's key versions", run: runKeys})
}

const keysUsage = `usage: hsmd keys <subcommand> TENANT [VERSION] [flags]

subcommands:
  show T                 print the key: current version, policy, next rotation, versions
  rotate T               make a new key version current; older versions keep decrypting
  policy T [--rotation-period 720h] [--min-decryption-version N] [--max-deks-per-version N]
                         change the policy: only the flags given change
  disable T V            make version V refuse to decrypt
  enable T V             let a disabled version V decrypt again
  destroy T V [--wait 168h]
                         destroy version V after a waiting period; until then it
                         refuses to decrypt and cancel-destroy can stop it
  cancel-destroy T V     cancel a scheduled destruction; V stays disabled
  public T               print the X-Wing public key of the current version, for
                         producers that seal records offline (docs/FORMAT.md, suite 0x02)

Each other subcommand prints the resulting key as show does.`

// keysOp describes one keys subcommand.
type keysOp struct {
	version bool   // takes a VERSION after the TENANT
	flags   string // the synopsis of its own flags
	what    string // names the operation in errors
}

var keysOps = map[string]keysOp{
	"show":           {what: "get key"},
	"rotate":         {what: "rotate key"},
	"policy":         {flags: " [--rotation-period D] [--min-decryption-version N] [--max-deks-per-version N]", what: "set key policy"},
	"disable":        {version: true, what: "disable key version"},
	"enable":         {version: true, what: "enable key version"},
	"destroy":        {version: true, flags: " [--wait D]", what: "schedule key version destruction"},
	"cancel-destroy": {version: true, what: "cancel key version destruction"},
	"public":         {what: "get public key"},
}

// keysCmd is one parsed keys invocation.
type keysCmd struct {
	sub     string
	tenant  string
	version uint32
	// policy: the flags given, and their values.
	given      map[string]bool
	period     time.Duration
	minVersion uint64
	maxDEKs    uint64
	// destroy
	wait     time.Duration
	approval string // --approval file (destroy)
}

func runKeys(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) == 0 {
		return &usageError{msg: "keys needs a subcommand\n" + keysUsage}
	}
	sub, args := args[0], args[1:]
	if sub == "help" || sub == "-h" || sub == "--help" {
		fmt.Fprintln(env.stdout, keysUsage)
		return nil
	}
	op, ok := keysOps[sub]
	if !ok {
		return &usageError{msg: fmt.Sprintf("unknown keys subcommand %q\n%s", sub, keysUsage)}
	}
	k, cf, err := parseKeysArgs(env, sub, op, args)
	if err != nil {
		return err
	}
	c, err := cf.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := cf.withTimeout(ctx)
	defer cancel()
	if sub == "public" {
		return printPublicKey(ctx, env.stdout, c, k.tenant)
	}
	key, err := k.call(ctx, c)
	if err != nil {
		return clientRPCError(op.what, err)
	}
	return printKey(env.stdout, key)
}

// parseKeysArgs parses the flags and arguments of a keys subcommand.
func parseKeysArgs(env *cliEnv, sub string, op keysOp, args []string) (*keysCmd, *connFlags, error) {
	synopsis := "hsmd keys " + sub + " TENANT"
	if op.version {
		synopsis += " VERSION"
	}
	synopsis += op.flags
	fs, cf := newClientFlagSet(env, "keys "+sub, synopsis+" [flags]")
	k := &keysCmd{sub: sub, given: map[string]bool{}}
	switch sub {
	case "policy":
		fs.DurationVar(&k.period, "rotation-period", 0, "rotate automatically this often (at least 1h; 0: never)")
		fs.Uint64Var(&k.minVersion, "min-decryption-version", 0, "versions below `N` refuse to decrypt (0 or 1: none)")
		fs.Uint64Var(&k.maxDEKs, "max-deks-per-version", 0, "rotate early once the current version derived `N` data keys (0: no limit)")
	case "destroy":
		fs.DurationVar(&k.wait, "wait", 0, "destroy after this waiting period (0: the server's default, 168h)")
		fs.StringVar(&k.approval, "approval", "", "quorum-approved request `file` (hsmd approve), when the server has a quorum policy")
	}
	pos, err := parseClientFlags(fs, args)
	if err != nil {
		return nil, nil, err
	}
	fs.Visit(func(f *flag.Flag) { k.given[f.Name] = true })
	if want := 1 + btoi(op.version); len(pos) != want {
		return nil, nil, &usageError{msg: "usage: " + synopsis}
	}
	k.tenant = pos[0]
	if op.version {
		if k.version, err = parseVersion(pos[1]); err != nil {
			return nil, nil, err
		}
	}
	if err := k.check(); err != nil {
		return nil, nil, err
	}
	return k, cf, nil
}

// check validates the subcommand's own flags.
func (k *keysCmd) check() error {
	switch k.sub {
	case "policy":
		if !k.given["rotation-period"] && !k.given["min-decryption-version"] && !k.given["max-deks-per-version"] {
			return &usageError{msg: "keys policy: give --rotation-period, --min-decryption-version or --max-deks-per-version"}
		}
		if err := checkSeconds("--rotation-period", k.period); err != nil {
			return err
		}
		if k.minVersion > math.MaxUint32 {
			return &usageError{msg: fmt.Sprintf("--min-decryption-version %d: too large", k.minVersion)}
		}
	case "destroy":
		return checkSeconds("--wait", k.wait)
	}
	return nil
}

// checkSeconds refuses a negative duration or one with a fraction of a
// second, which the API cannot carry.
func checkSeconds(name string, d time.Duration) error {
	if d < 0 || d%time.Second != 0 {
		return &usageError{msg: fmt.Sprintf("%s %v: want 0 or a positive whole number of seconds", name, d)}
	}
	return nil
}

// parseVersion parses a key version: a positive 32-bit integer.
func parseVersion(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil || v == 0 {
		return 0, &usageError{msg: fmt.Sprintf("key version %q: want a positive integer", s)}
	}
	return uint32(v), nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// call sends the subcommand's request.
func (k *keysCmd) call(ctx context.Context, c *client.Client) (client.Key, error) {
	switch k.sub {
	case "rotate":
		return c.RotateKey(ctx, k.tenant)
	case "policy":
		return k.setPolicy(ctx, c)
	case "disable":
		return c.DisableVersion(ctx, k.tenant, k.version)
	case "enable":
		return c.EnableVersion(ctx, k.tenant, k.version)
	case "destroy":
		var opts []client.CallOption
		if k.approval != "" {
			b, err := os.ReadFile(k.approval)
			if err != nil {
				return client.Key{}, err
			}
			opts = append(opts, client.WithApproval(b))
		}
		return c.ScheduleDestroy(ctx, k.tenant, k.version, k.wait, opts...)
	case "cancel-destroy":
		return c.CancelDestroy(ctx, k.tenant, k.version)
	default:
		return c.GetKey(ctx, k.tenant)
	}
}

// setPolicy changes the policy fields whose flags were given, keeping the
// others as GetKey read them. The read and the write are two calls: a
// policy change made by someone else in between is overwritten.
func (k *keysCmd) setPolicy(ctx context.Context, c *client.Client) (client.Key, error) {
	cur, err := c.GetKey(ctx, k.tenant)
	if err != nil {
		return client.Key{}, err
	}
	p := cur.Policy
	if k.given["rotation-period"] {
		p.RotationPeriod = k.period
	}
	if k.given["min-decryption-version"] {
		p.MinDecryptionVersion = uint32(k.minVersion)
	}
	if k.given["max-deks-per-version"] {
		p.MaxDEKsPerVersion = k.maxDEKs
	}
	return c.SetKeyPolicy(ctx, k.tenant, p)
}

// printKey prints a key: a header of aligned fields, then one line per
// version: version, kdk version, state, creation time, destruction time.
func printKey(w io.Writer, k client.Key) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "tenant:\t%s\n", k.Tenant)
	fmt.Fprintf(tw, "current version:\t%d\n", k.CurrentVersion)
	fmt.Fprintf(tw, "rotation period:\t%s\n", formatPeriod(k.Policy.RotationPeriod))
	fmt.Fprintf(tw, "min decryption version:\t%d\n", k.Policy.MinDecryptionVersion)
	fmt.Fprintf(tw, "max DEKs per version:\t%d\n", k.Policy.MaxDEKsPerVersion)
	fmt.Fprintf(tw, "next rotation:\t%s\n", formatTenantTime(k.NextRotation))
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "versions:")
	for _, v := range k.Versions {
		fmt.Fprintf(tw, "  %d\tkdk %d\t%s\t%s\t%s\n", v.Version, v.KDKVersion, v.State,
			formatTenantTime(v.CreateTime), formatTenantTime(v.DestroyTime))
	}
	return tw.Flush()
}

// formatPeriod prints a rotation period without trailing zero units
// ("720h", "1h30m"), or "never".
func formatPeriod(d time.Duration) string {
	if d == 0 {
		return "never"
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
