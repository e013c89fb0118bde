package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/ceremony"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/quorum"
)

func init() {
	register("ceremony", command{summary: "operator key ceremonies: plan, run, verify-transcript", run: runCeremony})
}

const ceremonyUsage = `usage:
  hsmd ceremony plan FILE.yaml (--config FILE | --dev) [--policy QUORUM.yaml]
  hsmd ceremony run FILE.yaml (--config FILE | --dev) [--policy QUORUM.yaml]
  hsmd ceremony verify-transcript TRANSCRIPT [--key VKEY ...]
Run ceremonies with hsmd stopped: they need the token, the TPM and the store to themselves.`

// QuorumConfig names the quorum policy (operators and threshold) that
// destructive operations need approvals under (quorum.Policy YAML).
type QuorumConfig struct {
	Policy string `yaml:"policy"`
}

func runCeremony(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) == 0 {
		return &usageError{ceremonyUsage}
	}
	switch args[0] {
	case "plan", "run":
		return ceremonyPlanRun(ctx, env, args[0], args[1:])
	case "verify-transcript":
		return ceremonyVerify(env, args[1:])
	}
	return &usageError{fmt.Sprintf("unknown ceremony subcommand %q\n%s", args[0], ceremonyUsage)}
}

// splitFileArg takes the one positional argument wherever it is among the
// flags.
func splitFileArg(args []string) (string, []string, error) {
	var file string
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case !strings.HasPrefix(a, "-") && file == "":
			file = a
		case !strings.HasPrefix(a, "-"):
			return "", nil, &usageError{"one ceremony file at a time\n" + ceremonyUsage}
		default:
			rest = append(rest, a)
			if !strings.Contains(a, "=") && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") &&
				a != "--dev" && a != "-dev" && a != "--insecure-no-tpm" && a != "-insecure-no-tpm" {
				i++
				rest = append(rest, args[i])
			}
		}
	}
	if file == "" {
		return "", nil, &usageError{ceremonyUsage}
	}
	return file, rest, nil
}

func ceremonyPlanRun(ctx context.Context, env *cliEnv, sub string, args []string) error {
	file, rest, err := splitFileArg(args)
	if err != nil {
		return err
	}
	fs := flag.NewFlagSet("hsmd ceremony "+sub, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var p profileFlags
	p.register(fs)
	policyPath := fs.String("policy", "", "quorum policy (operators, threshold); default quorum.policy of the config")
	if err := fs.Parse(rest); err != nil {
		return &usageError{err.Error()}
	}
	f, err := ceremony.Load(file)
	if err != nil {
		return err
	}
	log := newLogger(env, "warn")
	c, dev, err := p.load(func(f string, a ...any) { log.Info(fmt.Sprintf(f, a...)) })
	if err != nil {
		return err
	}
	if *policyPath == "" {
		*policyPath = c.Quorum.Policy
	}
	cenv := &ceremony.Env{TokenLabel: c.HSM.TokenLabel, Out: env.stdout}
	if *policyPath != "" {
		pol, err := quorum.LoadPolicy(*policyPath)
		if err != nil {
			return err
		}
		spent := quorum.NewFileSpent(filepath.Join(c.DataDir, "quorum-spent.json"))
		cenv.Approve = func(ctx context.Context, file string, op quorum.Operation) (*quorum.Approval, error) {
			b, err := os.ReadFile(file)
			if err != nil {
				return nil, err
			}
			return pol.Authorize(ctx, spent, b, op, time.Now())
		}
	}
	// root-init, and a restore into a data directory not yet set up, work
	// on a token without roots; the others (and a restore of a rotated kdk
	// onto a running replica's token) on the initialised data directory.
	initialised := exists(filepath.Join(c.DataDir, "hsmd.db"))
	if f.Ceremony == ceremony.KindRootInit || (f.Ceremony == ceremony.KindRestore && !initialised) {
		return ceremonyOnNewToken(ctx, env, sub, f, c, &p, dev, cenv, log)
	}
	pt, err := bootstrap(ctx, c, p.insecure, false, dev, log)
	if err != nil {
		return err
	}
	defer pt.close()
	cenv.HSM = pt.hsm
	cenv.KDKInUse = pt.kdkInUse
	if sub == "plan" {
		return printPlan(ctx, env, f, cenv)
	}
	cenv.Record = func(ctx context.Context, s ceremony.Step) error {
		return pt.audit.Append(ctx, ceremonyEntry(f, s), true)
	}
	t, err := ceremony.Run(ctx, f, cenv)
	if err != nil {
		return err
	}
	if pt.counter != nil {
		if _, err := pt.counter.Advance(ctx); err != nil {
			return fmt.Errorf("the ceremony is done, but advancing the rollback counter failed: %w", err)
		}
	}
	return ceremonyDone(env, f, t)
}

// ceremonyOnNewToken runs root-init or restore: on a token without roots,
// with the PIN from hsm.pin_file (or the dev profile's new token), then
// initialises the data directory as `hsmd init` does (sealing the PIN to
// the TPM) and records the ceremony's steps in the new audit log.
func ceremonyOnNewToken(ctx context.Context, env *cliEnv, sub string, f *ceremony.File, c *Config, p *profileFlags, dev devSetup, cenv *ceremony.Env, log *slog.Logger) error {
	hc := c.HSM
	switch {
	case dev.newPIN != nil:
		pin := dev.newPIN
		hc.PINFile, hc.PINFD, hc.PINSource = "", 0, func() ([]byte, error) { return append([]byte(nil), pin...), nil }
	case p.dev || p.insecure:
		// The dev token's PIN file (--insecure-no-tpm) or an existing dev
		// data dir: bootstrap below refuses a token that has roots.
	default:
		if exists(filepath.Join(c.DataDir, localstate.SealedFile)) {
			return withHint(errors.New("this data directory is initialised"), "root-init and restore set up a new data directory and token")
		}
		// As `hsmd init`: the PIN from hsm.pin_file is sealed to the TPM
		// once the roots exist.
		if sub == "run" {
			pin, err := c.HSM.ReadPIN()
			if err != nil {
				return err
			}
			dev.newPIN = pin
			defer clear(pin)
		}
	}
	h, err := hsm.Open(ctx, hc)
	if err != nil {
		return withHint(err, "check hsm.module, hsm.token_label and hsm.pin_file")
	}
	cenv.HSM = h
	if sub == "plan" {
		defer h.Close()
		return printPlan(ctx, env, f, cenv)
	}
	var steps []ceremony.Step
	cenv.Record = func(_ context.Context, s ceremony.Step) error { steps = append(steps, s); return nil }
	t, err := ceremony.Run(ctx, f, cenv)
	if cerr := h.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	pt, err := bootstrap(ctx, c, p.insecure, false, dev, log)
	if err != nil {
		return fmt.Errorf("the ceremony is done (transcript %s), but starting on the new keys failed: %w", f.Transcript, err)
	}
	defer pt.close()
	for _, s := range steps {
		if err := pt.audit.Append(ctx, ceremonyEntry(f, s), true); err != nil {
			return fmt.Errorf("the ceremony is done (transcript %s), but the audit log refused its steps: %w", f.Transcript, err)
		}
	}
	return ceremonyDone(env, f, t)
}

func ceremonyEntry(f *ceremony.File, s ceremony.Step) audit.Entry {
	return audit.Entry{Kind: audit.KindSystem, Op: "ceremony." + s.Action, Detail: fmt.Sprintf("%s %s: %s", f.Ceremony, f.ID, s.Detail)}
}

func printPlan(ctx context.Context, env *cliEnv, f *ceremony.File, cenv *ceremony.Env) error {
	steps, err := ceremony.Plan(ctx, f, cenv)
	if err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "ceremony %s %s would, on token %q:\n", f.Ceremony, f.ID, cenv.TokenLabel)
	for i, s := range steps {
		fmt.Fprintf(env.stdout, "  %2d. %s\n", i+1, s)
	}
	if op, ok := f.Operation(); ok {
		params := ""
		for _, k := range slices.Sorted(maps.Keys(op.Params)) {
			params += " --param " + k + "=" + op.Params[k]
		}
		fmt.Fprintf(env.stdout, "approvals needed for: %s\n  create the request with: hsmd approve new --kind %s%s --out REQUEST\n", op, op.Kind, params)
	}
	fmt.Fprintln(env.stdout, "nothing was changed")
	return nil
}

func ceremonyDone(env *cliEnv, f *ceremony.File, t *ceremony.Transcript) error {
	fmt.Fprintf(env.stdout, "ceremony %s %s done; transcript signed by:\n", f.Ceremony, f.ID)
	for _, k := range t.Signers {
		fmt.Fprintf(env.stdout, "  %s\n", k)
	}
	fmt.Fprintln(env.stdout, "record these verifier keys outside this machine: `hsmd ceremony verify-transcript FILE --key KEY` checks transcripts with them")
	return nil
}

// kdkInUse counts the tenant key versions (not destroyed) that derive
// from kdk version v.
func (p *parts) kdkInUse(ctx context.Context, v uint32) (int, error) {
	n, after := 0, ""
	for {
		ts, err := p.meta.ListTenants(ctx, after, 500)
		if err != nil {
			return 0, err
		}
		for _, t := range ts {
			for _, kv := range t.Versions {
				if kv.KDKVersion == v && len(kv.Salt) > 0 {
					n++
				}
			}
			after = t.Name
		}
		if len(ts) < 500 {
			return n, nil
		}
	}
}

func ceremonyVerify(env *cliEnv, args []string) error {
	file, rest, err := splitFileArg(args)
	if err != nil {
		return err
	}
	fs := flag.NewFlagSet("hsmd ceremony verify-transcript", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var keys keyList
	fs.Var(&keys, "key", "a verifier key the transcript must be signed by (repeatable); default: the keys it names itself")
	if err := fs.Parse(rest); err != nil {
		return &usageError{err.Error()}
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	t, self, err := ceremony.VerifyTranscript(b, keys)
	if err != nil {
		return err
	}
	if self {
		fmt.Fprintln(env.stderr, "hsmd: warning: checked against the keys the transcript names itself: this proves it unchanged since signed, not who signed it; pass --key with keys recorded elsewhere")
	}
	fmt.Fprintf(env.stdout, "transcript of ceremony %s %s on token %q verifies (%s to %s, %d steps)\n",
		t.Ceremony, t.ID, t.Token, t.Started.Format(time.RFC3339), t.Finished.Format(time.RFC3339), len(t.Steps))
	for _, k := range t.Keys {
		fmt.Fprintf(env.stdout, "  %s %s\n", k.Label, k.Origin)
	}
	if t.Approval != nil {
		fmt.Fprintf(env.stdout, "  approved by %s\n", strings.Join(t.Approval.Approvers, ", "))
	}
	return nil
}
