package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/tpm"
)

func init() {
	register("tpm", command{summary: "TPM status: provider, PCR policy, rollback counter, whether the sealed secrets open", run: runTPM})
}

// runTPM implements `hsmd tpm status`. It opens the TPM itself, so run it
// while hsmd is stopped: swtpm serves one connection at a time, and the
// simulator lives inside the hsmd process (a new one has no counter).
func runTPM(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) == 0 || args[0] != "status" {
		return &usageError{"usage: hsmd tpm status (--config FILE | --dev [--data-dir DIR])"}
	}
	fs := flag.NewFlagSet("hsmd tpm status", flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	var p profileFlags
	p.register(fs)
	if err := fs.Parse(args[1:]); err != nil {
		return &usageError{err.Error()}
	}
	c, err := p.loadConfig(func(string, ...any) {})
	if err != nil {
		return err
	}
	if p.dev && c.TPM.Provider == "" {
		if c.TPM, err = devSimulator(c.DataDir); err != nil {
			return err
		}
	}
	if c.TPM.Provider == "" || c.TPM.Provider == tpm.ProviderNone {
		fmt.Fprintln(env.stdout, "provider:        none (hsmd runs with --insecure-no-tpm: no sealing, no rollback protection)")
		return nil
	}
	t, err := tpm.Open(ctx, c.TPM)
	if err != nil {
		return withHint(err, "is hsmd running? it holds the TPM connection; stop it first")
	}
	defer t.Close()
	info := t.Info()
	fmt.Fprintf(env.stdout, "provider:        %s\n", info)
	fmt.Fprintf(env.stdout, "pcr policy:      sha256 %v\n", info.PCRs)
	if n, err := t.ReadCounter(ctx); err != nil {
		fmt.Fprintf(env.stdout, "rollback counter: not readable (%v)\n", err)
	} else {
		fmt.Fprintf(env.stdout, "rollback counter: %d (index %#x)\n", n, info.NVIndex)
	}
	s, err := localstate.Unseal(ctx, t, c.DataDir)
	if err != nil {
		fmt.Fprintf(env.stdout, "sealed secrets:  do NOT open: %v\n", err)
		return nil
	}
	s.Clear()
	fmt.Fprintln(env.stdout, "sealed secrets:  open")
	return nil
}
