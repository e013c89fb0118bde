package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/tpm"
)

// Defaults of the configuration. The dev profile uses them all.
const (
	DefaultDataDir     = "./var"
	DefaultTCPAddr     = "127.0.0.1:7443"
	DefaultMetricsAddr = "127.0.0.1:9464"
	DevTokenLabel      = "hsmd-dev"
	maxConfigSize      = 1 << 20
)

// Config is hsmd's configuration file (YAML, strict: unknown keys are
// errors). It names where secrets are, never holds them.
type Config struct {
	DataDir  string         `yaml:"data_dir"`
	Listen   ListenConfig   `yaml:"listen"`
	HSM      hsm.Config     `yaml:"hsm"`
	TPM      tpm.Config     `yaml:"tpm"`
	Limits   server.Limits  `yaml:"limits"`
	Envelope EnvelopeConfig `yaml:"envelope"`
	Audit    AuditConfig    `yaml:"audit"`
	Witness  WitnessConfig  `yaml:"witness"`
	Quorum   QuorumConfig   `yaml:"quorum"`
	Log      LogConfig      `yaml:"log"`
	TLS      TLSConfig      `yaml:"tls"`
	KMS      KMSConfig      `yaml:"kms"`
	Authz    AuthzConfig    `yaml:"authz"`
	Store    StoreConfig    `yaml:"store"`

	newAuditLog bool // --new-audit-log (not in the file)
}

// ListenConfig says where hsmd listens. An empty address is not served.
type ListenConfig struct {
	Unix    string `yaml:"unix"`    // socket path; default <data_dir>/hsmd.sock
	TCP     string `yaml:"tcp"`     // host:port; TLS 1.3 with a tls: section, else plaintext and loopback only
	Metrics string `yaml:"metrics"` // host:port of the Prometheus /metrics endpoint
	// Witness is the host:port of the C2SP tlog-witness HTTP endpoint
	// (POST /add-checkpoint); not served if empty. Requests are
	// authenticated by the logs' own signatures.
	Witness string `yaml:"witness"`
}

// EnvelopeConfig bounds data key use (see the envelope package).
type EnvelopeConfig struct {
	MaxItemsPerKey uint64        `yaml:"max_items_per_key"`
	MaxBytesPerKey uint64        `yaml:"max_bytes_per_key"`
	MaxKeyAge      time.Duration `yaml:"max_key_age"`
	CacheSize      int           `yaml:"cache_size"`
	MaxKeyGroups   int           `yaml:"max_key_groups"` // data keys one decrypt batch may span
}

// LogConfig sets the log level: debug, info, warn or error.
type LogConfig struct {
	Level string `yaml:"level"`
}

// loadConfig reads a strict YAML file.
func loadConfig(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("config: %s is over %d bytes", path, maxConfigSize)
	}
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config: %s: %w", path, err)
	}
	return &c, nil
}

// applyDefaults fills what the file left out.
func (c *Config) applyDefaults() {
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.Listen.Unix == "" {
		c.Listen.Unix = filepath.Join(c.DataDir, "hsmd.sock")
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	c.Limits = c.Limits.WithDefaults()
	if c.Store.Etcd != nil {
		c.Store.Etcd.applyDefaults()
	}
	c.auditDefaults()
}

// validate names the YAML path of the first problem. insecure is
// --insecure-no-tpm; the HSM's PIN source is checked once it is known.
func (c *Config) validate(insecure bool) error {
	if !insecure {
		if c.TPM.Provider == "" || c.TPM.Provider == tpm.ProviderNone {
			return withHint(errors.New("tpm.provider is required (device, swtpm or simulator)"),
				"hsmd seals its PIN and state key to the TPM; to run without one, pass --insecure-no-tpm")
		}
		if err := c.TPM.Validate(); err != nil {
			return err
		}
		if c.TPM.Provider == tpm.ProviderSimulator && c.TPM.SimulatorSeed == 0 {
			return errors.New("tpm.provider simulator is for the dev profile only (--dev): its keys are reproducible by anyone, so it protects nothing")
		}
	}
	if err := c.Limits.Validate(); err != nil {
		return err
	}
	if err := c.validateAudit(); err != nil {
		return err
	}
	if err := c.TLS.validate(); err != nil {
		return err
	}
	if c.Store.Etcd != nil {
		if err := c.Store.Etcd.validate(); err != nil {
			return err
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log.level must be debug, info, warn or error, not %q", c.Log.Level)
	}
	if c.Envelope.MaxItemsPerKey > 1<<32 {
		return fmt.Errorf("envelope.max_items_per_key must be at most 2^32 (the AES-GCM random nonce bound)")
	}
	if c.Envelope.MaxKeyAge < 0 || c.Envelope.CacheSize < 0 || c.Envelope.MaxKeyGroups < 0 {
		return fmt.Errorf("envelope.max_key_age, envelope.cache_size and envelope.max_key_groups must not be negative")
	}
	if n := c.Envelope.MaxItemsPerKey; n != 0 && n < uint64(c.Limits.MaxBatchItems) {
		return fmt.Errorf("envelope.max_items_per_key (%d) must be at least limits.max_batch_items (%d)", n, c.Limits.MaxBatchItems)
	}
	return nil
}

func (c *Config) envelopeConfig(d envelope.Deriver) envelope.Config {
	return envelope.Config{
		Deriver: d,
		Limits: envelope.Limits{
			MaxItems: c.Envelope.MaxItemsPerKey, MaxBytes: c.Envelope.MaxBytesPerKey, MaxAge: c.Envelope.MaxKeyAge,
		},
		CacheSize: c.Envelope.CacheSize,
		MaxGroups: c.Envelope.MaxKeyGroups,
	}
}
