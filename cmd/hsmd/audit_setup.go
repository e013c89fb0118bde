package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/fsutil"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/signing"
)

// AuditConfig configures hsmd's own audit log (<data_dir>/audit).
type AuditConfig struct {
	// Origin names the log: the first line of its checkpoints and the name
	// of its keys. Default "hsmd/<hostname>".
	Origin string `yaml:"origin"`
	// Sync makes data-plane replies wait until their entry is durable
	// (key management always does).
	Sync bool `yaml:"sync"`
	// Timeout bounds how long a call waits for the log (default 5s); past
	// it the call fails with UNAVAILABLE.
	Timeout time.Duration `yaml:"timeout"`
	// CheckpointInterval is how often a grown log publishes a signed
	// checkpoint (default 5s, at least 100ms).
	CheckpointInterval time.Duration `yaml:"checkpoint_interval"`
	// QueueLimit bounds the entries waiting to be written (default 65536).
	QueueLimit int `yaml:"queue_limit"`
}

// WitnessConfig makes hsmd a C2SP tlog-witness for other components' logs
// (Audit.SignCheckpoint over gRPC; add-checkpoint over HTTP when
// listen.witness is set).
type WitnessConfig struct {
	// Name is the witness's key name in its cosignatures; default
	// "<audit origin>/witness".
	Name string `yaml:"name"`
	// Logs are the registered logs: only their checkpoints are cosigned.
	Logs []WitnessLog `yaml:"logs"`
}

// WitnessVerifiersFile, in the data dir, lists the verifier keys of the
// witness's signatures: the cosignature/v1 Ed25519 key first, then the
// optional ECDSA P-256 and ML-DSA-44 ones.
const WitnessVerifiersFile = "witness.verifiers"

// WitnessLog is one registered log: its origin and its verifier key (C2SP
// signed-note text form).
type WitnessLog struct {
	Origin string `yaml:"origin"`
	Key    string `yaml:"key"`
}

func (c *Config) auditDefaults() {
	if c.Audit.Origin == "" && c.Store.Etcd != nil {
		c.Audit.Origin = "hsmd/" + c.Store.Etcd.Replica // each replica writes its own log
	}
	if c.Audit.Origin == "" {
		host, err := os.Hostname()
		if err != nil || host == "" {
			host = "localhost"
		}
		c.Audit.Origin = "hsmd/" + host
	}
	if c.Witness.Name == "" {
		c.Witness.Name = c.Audit.Origin + "/witness"
	}
}

func (c *Config) validateAudit() error {
	if strings.ContainsAny(c.Audit.Origin, " +\n") {
		return fmt.Errorf("audit.origin %q must not contain spaces, '+' or newlines", c.Audit.Origin)
	}
	if c.Audit.Timeout < 0 || c.Audit.QueueLimit < 0 {
		return errors.New("audit.timeout and audit.queue_limit must not be negative")
	}
	if i := c.Audit.CheckpointInterval; i != 0 && i < 100*time.Millisecond {
		return fmt.Errorf("audit.checkpoint_interval must be at least 100ms, not %v", i)
	}
	if strings.ContainsAny(c.Witness.Name, " +\n") {
		return fmt.Errorf("witness.name %q must not contain spaces, '+' or newlines", c.Witness.Name)
	}
	seen := map[string]bool{}
	for i, l := range c.Witness.Logs {
		if l.Origin == "" || seen[l.Origin] {
			return fmt.Errorf("witness.logs[%d].origin is empty or repeated", i)
		}
		seen[l.Origin] = true
		v, err := tnote.NewVerifier(l.Key)
		if err != nil {
			return fmt.Errorf("witness.logs[%d].key: %w", i, err)
		}
		if v.Name() != l.Origin {
			return fmt.Errorf("witness.logs[%d].key is named %q, not the origin %q", i, v.Name(), l.Origin)
		}
	}
	return nil
}

// auditSigners are the checkpoint signers of the log named origin: the
// token's Ed25519 and ECDSA P-256 keys (signing inside the HSM) and the
// ML-DSA-44 key sealed under its wrap key.
func auditSigners(ctx context.Context, h *hsm.HSM, origin string, mldsa []byte) ([]note.Signer, error) {
	var out []note.Signer
	for _, alg := range []hsm.SignAlg{hsm.Ed25519, hsm.ECDSAP256} {
		cs, err := h.Signer(ctx, alg)
		if err != nil {
			return nil, err
		}
		ns, err := signing.NewNoteSigner(origin, cs)
		if err != nil {
			return nil, err
		}
		out = append(out, ns)
	}
	ml, err := signing.NewMLDSASigner(origin, mldsa)
	if err != nil {
		return nil, err
	}
	return append(out, ml), nil
}

// openAudit opens the audit log with the HSM's signers and publishes the
// verifier keys in the audit directory.
func (p *parts) openAudit(ctx context.Context) error {
	audit.QuietTessera(p.log)
	dir := filepath.Join(p.cfg.DataDir, "audit")
	keys, err := audit.LoadKeys(ctx, dir, p.hsm, nil)
	if err != nil {
		return withHint(err, "the audit keys are sealed under this token's wrap key: the token must be the one this data directory was made with")
	}
	defer keys.Clear()
	p.auditMLDSA = append([]byte(nil), keys.MLDSA...)
	p.closers = append(p.closers, func() error { clear(p.auditMLDSA); return nil })
	signers, err := auditSigners(ctx, p.hsm, p.cfg.Audit.Origin, keys.MLDSA)
	if err != nil {
		return err
	}
	if p.auditCtx, err = audit.NewContextHasher(keys.Context); err != nil {
		return err
	}
	if err := audit.WriteVerifiers(dir, audit.VerifierKeys(signers)); err != nil {
		return err
	}
	a := p.cfg.Audit
	l, err := audit.Open(ctx, audit.Config{
		Dir: dir, Signers: signers, Sync: a.Sync, Timeout: a.Timeout,
		CheckpointInterval: a.CheckpointInterval, QueueLimit: a.QueueLimit, Logger: p.log,
		OnWrite: func(n int, d time.Duration, err error) {
			if m := p.auditMetrics; m != nil {
				m(n, d, err)
			}
		},
	})
	if err != nil {
		return withHint(err, "check that the audit directory "+dir+" is writable and has space")
	}
	p.audit = l
	p.closers = append(p.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// Only a log that recorded a start records the stop: a start refused
		// (a rolled-back log, say) must not add to the log it refused.
		if p.auditStarted {
			if err := l.Append(ctx, audit.Entry{Kind: audit.KindSystem, Op: "stop"}, true); err != nil {
				p.log.Warn("audit: recording the stop", slog.Any("error", err))
			}
		}
		return l.Close(ctx)
	})
	return nil
}

// checkAnchor refuses a truncated, rolled-back or deleted audit log at
// start: the log must extend the head its TPM-bound anchor recorded, and
// the anchor must not be older than the TPM's counter n. A missing log is
// accepted only on the data directory's first start (fresh) or with
// --new-audit-log. From then on the anchor is rewritten with each advance
// of the counter.
func (p *parts) checkAnchor(ctx context.Context, n uint64, fresh bool) error {
	if err := p.audit.CheckAnchor(ctx, n, p.secrets.MAC, fresh || p.newAuditLog); err != nil {
		return withHint(err, "restore the audit directory from the latest backup of this data directory (`hsmd audit verify` tells what is damaged); to begin a new log on purpose (a data directory from before the audit log), start once with --new-audit-log")
	}
	if p.newAuditLog && !fresh {
		p.log.Warn("--new-audit-log: beginning a new audit log on an existing data directory")
	}
	p.counter.OnBind = func(ctx context.Context, next uint64) error {
		return p.audit.Bind(ctx, next, p.secrets.MAC)
	}
	return nil
}

// witness builds the tlog-witness of the configuration (nil if no log is
// registered): cosignatures by the token's Ed25519 key, extra signatures
// by its ECDSA key and the audit ML-DSA key.
func (p *parts) witness(ctx context.Context) (*signing.Witness, server.WitnessConfig, error) {
	c := p.cfg.Witness
	if len(c.Logs) == 0 {
		return nil, server.WitnessConfig{}, nil
	}
	logs := map[string]note.Verifier{}
	for _, l := range c.Logs {
		v, err := tnote.NewVerifier(l.Key)
		if err != nil {
			return nil, server.WitnessConfig{}, err
		}
		logs[l.Origin] = v
	}
	ed, err := p.hsm.Signer(ctx, hsm.Ed25519)
	if err != nil {
		return nil, server.WitnessConfig{}, err
	}
	cosigner, err := signing.NewCosignatureV1Signer(c.Name, ed, nil)
	if err != nil {
		return nil, server.WitnessConfig{}, err
	}
	state, err := signing.NewFileWitnessState(filepath.Join(p.cfg.DataDir, "witness.json"))
	if err != nil {
		return nil, server.WitnessConfig{}, err
	}
	ec, err := p.hsm.Signer(ctx, hsm.ECDSAP256)
	if err != nil {
		return nil, server.WitnessConfig{}, err
	}
	ecs, err := signing.NewNoteSigner(c.Name, ec)
	if err != nil {
		return nil, server.WitnessConfig{}, err
	}
	ml, err := signing.NewMLDSASigner(c.Name, p.auditMLDSA)
	if err != nil {
		return nil, server.WitnessConfig{}, err
	}
	// The verifier keys of the witness's signatures, for its users.
	vkeys := cosigner.VerifierKey() + "\n" + ecs.VerifierKey() + "\n" + ml.VerifierKey() + "\n"
	if err := fsutil.WriteFileAtomic(filepath.Join(p.cfg.DataDir, WitnessVerifiersFile), []byte(vkeys), 0o644); err != nil {
		return nil, server.WitnessConfig{}, err
	}
	w := &signing.Witness{Signer: cosigner, Logs: logs, State: state}
	return w, server.WitnessConfig{ECDSA: ecs, MLDSA: ml, Logger: p.log}, nil
}
