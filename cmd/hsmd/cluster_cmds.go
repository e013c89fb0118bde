package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/cluster"
	"github.com/hsmd/hsmd/store/etcd"
)

func init() {
	register("cluster", command{summary: "a cluster of replicas on etcd: status, verify-audit", run: runCluster})
}

const clusterUsage = `usage: hsmd cluster <subcommand> --config FILE [flags]

subcommands (the configuration's store.etcd names the cluster):
  status                 members, leader, each replica's applied metadata revision and published audit checkpoint
  verify-audit DIR ...   verify each replica's audit log (a data directory, or a copy of it) and that it
                         holds the checkpoint the replica published in etcd`

func runCluster(ctx context.Context, env *cliEnv, args []string) error {
	if len(args) == 0 {
		return &usageError{clusterUsage}
	}
	sub, rest := args[0], args[1:]
	fs := flag.NewFlagSet("hsmd cluster "+sub, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	config := fs.String("config", "", "configuration file (YAML) with a store.etcd section")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for etcd")
	if sub != "status" && sub != "verify-audit" {
		return &usageError{fmt.Sprintf("unknown cluster subcommand %q\n%s", sub, clusterUsage)}
	}
	if err := fs.Parse(rest); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &usageError{err.Error()}
	}
	if *config == "" {
		return &usageError{"--config FILE is required"}
	}
	c, err := loadConfig(*config)
	if err != nil {
		return err
	}
	c.applyDefaults()
	if c.Store.Etcd == nil {
		return withHint(errors.New("the configuration has no store.etcd section"), "hsmd cluster is for replicas that share an etcd store")
	}
	if err := c.Store.Etcd.validate(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	tc, err := c.Store.Etcd.tlsConfig()
	if err != nil {
		return err
	}
	st, err := etcd.Open(ctx, etcd.Options{Endpoints: c.Store.Etcd.Endpoints, TLS: tc, Prefix: c.Store.Etcd.Prefix})
	if err != nil {
		return withHint(err, "check store.etcd.endpoints and that a quorum of etcd members runs")
	}
	defer st.Close()
	if sub == "status" {
		if fs.NArg() > 0 {
			return &usageError{"hsmd cluster status takes no arguments"}
		}
		return clusterStatus(ctx, env, st)
	}
	if fs.NArg() == 0 {
		return &usageError{"hsmd cluster verify-audit needs the data directories of the replicas"}
	}
	return clusterVerifyAudit(ctx, env, st, fs.Args())
}

// clusterStatus prints the members and what each has applied.
func clusterStatus(ctx context.Context, env *cliEnv, st *etcd.Store) error {
	s, err := cluster.ReadStatus(ctx, st.Client(), st.Prefix())
	if err != nil {
		return err
	}
	cps, err := cluster.Checkpoints(ctx, st.Client(), st.Prefix())
	if err != nil {
		return err
	}
	// The newest tenant change: a replica that has applied it is current.
	resp, err := st.Client().Get(ctx, st.TenantsPrefix(), clientv3.WithLastRev()...)
	if err != nil {
		return err
	}
	var newest int64
	if len(resp.Kvs) > 0 {
		newest = resp.Kvs[0].ModRevision
	}
	leader := s.Leader
	if leader == "" {
		leader = "(none)"
	}
	fmt.Fprintf(env.stdout, "store revision:        %d\nnewest tenant change:  %d\nleader:                %s\nmembers:               %d\n\n",
		s.Revision, newest, leader, len(s.Members))
	w := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "REPLICA\tADDRESS\tAPPLIED\tCURRENT\tUPDATED\tAUDIT CHECKPOINT")
	for _, m := range s.Members {
		role := m.Name
		if m.Name == s.Leader {
			role += " (leader)"
		}
		current := "yes"
		if m.Applied < newest {
			current = "NO"
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s ago\t%s\n", role, m.Addr, m.Applied, current,
			time.Since(m.Updated).Round(time.Second), checkpointSummary(cps[m.Name]))
	}
	w.Flush()
	// Logs of replicas that are not members now (stopped, or gone).
	var gone []string
	for name := range cps {
		if !slices.ContainsFunc(s.Members, func(m cluster.MemberInfo) bool { return m.Name == name }) {
			gone = append(gone, name)
		}
	}
	slices.Sort(gone)
	for _, name := range gone {
		fmt.Fprintf(env.stdout, "not a member now: %s, audit checkpoint %s\n", name, checkpointSummary(cps[name]))
	}
	return nil
}

// checkpointSummary is "<origin> size N", or "-".
func checkpointSummary(cp []byte) string {
	lines := strings.SplitN(string(cp), "\n", 3)
	if len(lines) < 2 {
		return "-"
	}
	return lines[0] + " size " + lines[1]
}

// clusterVerifyAudit verifies each replica's log and checks that its
// checkpoint archive holds the checkpoint the replica published in etcd
// (so the log has not been cut back or forked since). Replicas with a
// published checkpoint whose log was not given are listed.
func clusterVerifyAudit(ctx context.Context, env *cliEnv, st *etcd.Store, dirs []string) error {
	cps, err := cluster.Checkpoints(ctx, st.Client(), st.Prefix())
	if err != nil {
		return err
	}
	byOrigin := map[string]string{} // origin → replica name
	for name, cp := range cps {
		byOrigin[strings.SplitN(string(cp), "\n", 2)[0]] = name
	}
	checked := map[string]bool{}
	var failed []string
	for _, d := range dirs {
		dir := d
		if _, err := os.Stat(filepath.Join(dir, audit.TreeDir)); err != nil {
			dir = filepath.Join(d, auditDirName)
		}
		err := verifyReplicaLog(ctx, env, dir, cps, byOrigin, checked)
		if err != nil {
			fmt.Fprintf(env.stdout, "%s: FAILED: %v\n", d, err)
			failed = append(failed, d)
		}
	}
	for name := range cps {
		if !checked[name] {
			fmt.Fprintf(env.stdout, "replica %s: published %s; its log was not given\n", name, checkpointSummary(cps[name]))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d audit logs do not verify: %s", len(failed), len(dirs), strings.Join(failed, ", "))
	}
	return nil
}

func verifyReplicaLog(ctx context.Context, env *cliEnv, dir string, cps map[string][]byte, byOrigin map[string]string, checked map[string]bool) error {
	a := auditFlags{dataDir: filepath.Dir(dir)}
	vs, err := a.verifiers(env, dir)
	if err != nil {
		return err
	}
	rep, err := audit.Verify(ctx, dir, vs)
	if err != nil {
		return err
	}
	head, err := os.ReadFile(filepath.Join(dir, audit.TreeDir, "checkpoint"))
	if err != nil {
		return err
	}
	origin := strings.SplitN(string(head), "\n", 2)[0]
	name, ok := byOrigin[origin]
	if !ok {
		return fmt.Errorf("log %s verifies (size %d) but no replica published a checkpoint for it in etcd", origin, rep.Size)
	}
	checked[name] = true
	published := cps[name]
	archive, err := os.ReadFile(filepath.Join(dir, audit.CheckpointsFile))
	if err != nil {
		return err
	}
	rec := binary.BigEndian.AppendUint32(nil, uint32(len(published)))
	if !bytes.Contains(archive, append(rec, published...)) {
		return fmt.Errorf("replica %s published %s in etcd, which this log never published: it was cut back or replaced", name, checkpointSummary(published))
	}
	fmt.Fprintf(env.stdout, "replica %s: log %s verified: %d entries, %d checkpoints, holds the published %s\n",
		name, dir, rep.Size, rep.Checkpoints, checkpointSummary(published))
	return nil
}
