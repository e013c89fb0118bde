package main

// Authorization: the authz: configuration section, and the reload of its
// policy file on SIGHUP or when the file changes.

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hsmd/hsmd/server"
)

// authzPollInterval is how often the policy file is checked for changes.
const authzPollInterval = time.Second

// AuthzConfig is the authz: section. Without a policy every caller may
// make every call (the dev profile); with one, calls are denied unless the
// policy allows them (see server.Policy).
type AuthzConfig struct {
	Policy string `yaml:"policy"` // YAML policy file, reloaded on SIGHUP or change
}

// authorizer loads the policy, if configured, and registers its metrics
// with d.reg. Nil without a policy.
func (d *daemon) authorizer(c *Config) (*server.Authorizer, error) {
	if c.Authz.Policy == "" {
		return nil, nil
	}
	a, err := server.NewAuthorizer(c.Authz.Policy, d.reg, d.log)
	if err != nil {
		return nil, withHint(err, "authz.policy names the principals allowed to call hsmd; fix the file or remove authz.policy")
	}
	return a, nil
}

// watchAuthz reloads a's policy on SIGHUP or when its file changes, until
// ctx is done. a may be nil.
func watchAuthz(ctx context.Context, a *server.Authorizer) {
	if a == nil {
		return
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	a.Watch(ctx, authzPollInterval, hup)
}
