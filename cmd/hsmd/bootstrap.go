package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/localstate"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
	"github.com/hsmd/hsmd/tpm"
)

// parts are what a started hsmd holds: the TPM and its unsealed secrets,
// the HSM, the store and the rollback counter. close releases them in
// reverse order.
type parts struct {
	cfg      *Config
	log      *slog.Logger
	insecure bool
	tpm      *tpm.TPM            // nil with --insecure-no-tpm
	secrets  *localstate.Secrets // nil with --insecure-no-tpm
	hsm      *hsm.HSM
	// store is the local bbolt store: the metadata of a single node, and
	// always what binds the data directory to the rollback counter.
	store *bolt.Store
	// meta is the metadata store the services use: store, or with
	// store.etcd the replica's cache of the cluster's.
	meta     store.Store
	replica  *replica            // nil without store.etcd
	counter  *localstate.Counter // nil with --insecure-no-tpm
	audit    *audit.Log
	auditCtx *audit.ContextHasher
	// auditMLDSA is the audit log's ML-DSA-44 key (also the witness's).
	auditMLDSA []byte
	// auditMetrics, if set, observes each write of the audit log.
	auditMetrics func(n int, d time.Duration, err error)
	// auditStarted: the log took this start's entry (so it takes the stop).
	auditStarted bool
	// newAuditLog: --new-audit-log, a missing log may begin anew.
	newAuditLog bool
	closers     []func() error
}

func (p *parts) close() {
	for i := len(p.closers) - 1; i >= 0; i-- {
		if err := p.closers[i](); err != nil {
			p.log.Warn("close", slog.Any("error", err))
		}
	}
	p.closers = nil
}

// bootstrap unseals the local secrets, opens the HSM (creating the root
// keys in the dev profile), opens and checks the store, and advances the
// rollback counter for this start. It refuses to start, saying why and what
// to do, if the TPM cannot unseal, the store was edited offline, or the data
// directory was rolled back. initKeys creates the root keys on a token that
// has none (hsmd init, and the dev profile's first start).
func bootstrap(ctx context.Context, c *Config, insecure, initKeys bool, dev devSetup, log *slog.Logger) (_ *parts, err error) {
	p := &parts{cfg: c, log: log, insecure: insecure, newAuditLog: c.newAuditLog}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	fresh, n, err := p.unseal(ctx, dev)
	if err != nil {
		return nil, err
	}
	if err := p.openHSM(ctx, initKeys); err != nil {
		return nil, err
	}
	var sealer store.Sealer
	if p.secrets != nil {
		sealer = p.secrets
	}
	if p.store, err = bolt.Open(filepath.Join(c.DataDir, "hsmd.db"), bolt.Options{Sealer: sealer}); err != nil {
		return nil, err
	}
	p.closers = append(p.closers, p.store.Close)
	p.meta = store.NewCached(p.store) // only this process writes it: cache decoded tenants
	if e := c.Store.Etcd; e != nil {
		if p.replica, err = openReplica(ctx, e, c.Listen.TCP, log); err != nil {
			return nil, err
		}
		p.closers = append(p.closers, func() error { p.replica.close(); return nil })
		p.meta = confirmedStore{p.replica.cache, p.replica}
	}
	if err := p.openAudit(ctx); err != nil {
		return nil, err
	}
	if insecure {
		log.Warn("running WITHOUT a TPM (--insecure-no-tpm): the HSM PIN is read from a file and the data directory (store and audit log) is not protected against offline edits or rollback")
		return p, nil
	}
	if err := p.bindCounter(ctx, fresh, n); err != nil {
		return nil, err
	}
	for _, f := range dev.legacy {
		os.Remove(f)
	}
	return p, nil
}

// unseal opens the TPM and unseals the secrets, or seals new ones for a
// PIN the dev profile (or init) just made. fresh says so; n is then the
// counter value.
func (p *parts) unseal(ctx context.Context, dev devSetup) (fresh bool, n uint64, err error) {
	if p.insecure {
		if exists(filepath.Join(p.cfg.DataDir, localstate.SealedFile)) {
			return false, 0, errors.New("this data directory is sealed to a TPM: --insecure-no-tpm would write records its seal does not cover")
		}
		return false, 0, nil
	}
	c := p.cfg
	if p.tpm, err = tpm.Open(ctx, c.TPM); err != nil {
		return false, 0, withHint(err, "check tpm.provider and tpm.address (or tpm.device); to run without a TPM, pass --insecure-no-tpm")
	}
	p.closers = append(p.closers, p.tpm.Close)
	if dev.newPIN != nil {
		defer clear(dev.newPIN)
		p.secrets, n, err = localstate.Init(ctx, p.tpm, c.DataDir, dev.newPIN)
		fresh = true
	} else {
		p.secrets, err = localstate.Unseal(ctx, p.tpm, c.DataDir)
	}
	if err != nil {
		return false, 0, unsealHint(err)
	}
	p.closers = append(p.closers, func() error { p.secrets.Clear(); return nil })
	if !fresh && (c.HSM.PINFile != "" || c.HSM.PINFD > 0) {
		p.log.Warn("hsm.pin_file and hsm.pin_fd are ignored: the PIN is sealed in the TPM; delete the PIN file")
	}
	c.HSM.PINFile, c.HSM.PINFD = "", 0
	c.HSM.PINSource = p.secrets.PIN
	return fresh, n, nil
}

func unsealHint(err error) error {
	switch {
	case errors.Is(err, localstate.ErrNotInitialized):
		return withHint(err, "run `hsmd init --config FILE` on this machine first")
	case errors.Is(err, tpm.ErrPCRMismatch):
		return withHint(err, "the machine's measured boot state changed since hsmd init (firmware, boot loader, Secure Boot keys); boot the previous state, or set up a new data directory and token (a reseal command for an intended change is not built yet)")
	case errors.Is(err, tpm.ErrWrongTPM):
		return withHint(err, "the sealed secrets belong to another TPM: this data directory was copied from another machine; run hsmd init here (a restore ceremony brings the keys)")
	case errors.Is(err, tpm.ErrCorrupt):
		return withHint(err, "the sealed blob is damaged: restore "+localstate.SealedFile+" from a backup of this machine, or re-run hsmd init")
	}
	return withHint(err, "check that the TPM is reachable")
}

func (p *parts) openHSM(ctx context.Context, initKeys bool) error {
	hc := p.cfg.HSM
	hc.Logger = p.log
	h, err := hsm.Open(ctx, hc)
	if err != nil {
		return withHint(err, "check hsm.module, hsm.token_label and the PIN")
	}
	p.hsm = h
	p.closers = append(p.closers, h.Close)
	err = h.LoadKeys(ctx)
	if errors.Is(err, hsm.ErrKeyNotFound) && initKeys {
		p.log.Info("creating the root keys on the token")
		if err = h.InitKeys(ctx); err == nil {
			err = h.LoadKeys(ctx)
		}
	}
	if errors.Is(err, hsm.ErrKeyNotFound) {
		return withHint(err, "create the root keys first: hsmd init --config FILE")
	}
	return err
}

// bindCounter checks the store against the TPM's rollback counter (or binds
// a fresh store to it), then advances the counter for this start, so that a
// copy of the data directory taken before it is refused from now on.
func (p *parts) bindCounter(ctx context.Context, fresh bool, n uint64) error {
	var err error
	switch {
	case fresh:
		err = p.store.Reseal(ctx, n)
	case p.cfg.TPM.Provider == tpm.ProviderSimulator:
		// The simulator's NV memory lives only as long as the process.
		n, err = localstate.AdoptCounter(ctx, p.tpm, p.store)
	default:
		n, err = localstate.Check(ctx, p.tpm, p.store)
	}
	if err != nil {
		return counterHint(err)
	}
	p.counter = localstate.NewCounter(p.tpm, p.store, n)
	if err := p.checkAnchor(ctx, n, fresh); err != nil {
		return err
	}
	if n, err = p.counter.Advance(ctx); err != nil {
		return err
	}
	p.log.Info("local state verified", slog.Uint64("rollback_counter", n), slog.String("tpm", p.tpm.Info().String()))
	return nil
}

func counterHint(err error) error {
	var rb *localstate.RollbackError
	var ah *localstate.AheadError
	switch {
	case errors.Is(err, store.ErrTampered):
		return withHint(err, "the data directory was changed outside hsmd: restore it from the latest backup")
	case errors.As(err, &rb):
		return withHint(err, "restore the latest copy of the data directory; an older copy would resurrect retired keys and tenants")
	case errors.As(err, &ah):
		return withHint(err, "run hsmd on the machine whose TPM this data directory belongs to")
	}
	return fmt.Errorf("local state: %w", err)
}
