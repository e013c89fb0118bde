package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/ceremony"
	"github.com/hsmd/hsmd/quorum"
	"github.com/hsmd/hsmd/softhsm"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// TestCeremonyCLI drives `hsmd ceremony` on a SoftHSM token without a TPM
// (--insecure-no-tpm): plan changes nothing, root-init, a refused rerun,
// rotate-signing, destroy-root under quorum (one approval refused, two
// accepted), transcripts checked with the printed keys, and every step in
// the audit log, which verifies across the signing key rotation.
func TestCeremonyCLI(t *testing.T) {
	audit.QuietTessera()
	tok := softhsm.NewTestToken(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	var skeys []string
	pol := "threshold: 2\noperators:\n"
	for i := range 3 {
		name := fmt.Sprintf("op%d", i+1)
		skey, vkey, err := quorum.GenerateKey(nil, name, quorum.KeyEd25519)
		if err != nil {
			t.Fatal(err)
		}
		skeys = append(skeys, skey)
		pol += fmt.Sprintf("  - name: %s\n    key: %s\n", name, vkey)
	}
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("quorum.yaml", pol)
	cfg := write("hsmd.yaml", fmt.Sprintf("data_dir: %s\nhsm:\n  module: %s\n  token_label: %s\n  pin_file: %s\naudit:\n  checkpoint_interval: 200ms\nquorum:\n  policy: %s\n",
		data, tok.Module, tok.Label, tok.PINFile, filepath.Join(dir, "quorum.yaml")))
	cer := func(args ...string) cliResult {
		return runCLI(t, "", nil, append(append([]string{"ceremony"}, args...), "--config", cfg, "--insecure-no-tpm")...)
	}

	initFile := write("init.yaml", "ceremony: root-init\nid: init\ntranscript: init.transcript\n")
	if r := cer("plan", initFile); r.code != 0 || !strings.Contains(r.stdout, "nothing was changed") {
		t.Fatalf("plan: %+v", r)
	}
	if r := cer("run", initFile); r.code != 0 || !strings.Contains(r.stdout, "transcript signed by") {
		t.Fatalf("root-init: %+v", r)
	}
	if r := cer("run", initFile); r.code == 0 || !strings.Contains(r.stderr, "exists") {
		t.Fatalf("rerun: %+v", r)
	}
	rot := write("rotate.yaml", "ceremony: rotate-signing\nid: rotate\nversion: 2\ntranscript: rotate.transcript\n")
	if r := cer("run", rot); r.code != 0 {
		t.Fatalf("rotate-signing: %+v", r)
	}

	destroy := write("destroy.yaml", "ceremony: destroy-root\nid: destroy\nkey: sig-ed25519\nversion: 1\napprovals: destroy.approval\ntranscript: destroy.transcript\n")
	f, err := ceremony.Load(destroy)
	if err != nil {
		t.Fatal(err)
	}
	op, _ := f.Operation()
	text, err := quorum.NewRequest(op, time.Now().Add(time.Hour), nil).MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	sign := func(b []byte, skey string) []byte {
		s, err := quorum.NewSigner(skey)
		if err != nil {
			t.Fatal(err)
		}
		if b, err = quorum.Approve(b, s); err != nil {
			t.Fatal(err)
		}
		return b
	}
	one := sign(text, skeys[0])
	write("destroy.approval", string(one))
	if r := cer("run", destroy); r.code == 0 || !strings.Contains(r.stderr, "approv") {
		t.Fatalf("destroy-root with one approval: %+v", r)
	}
	write("destroy.approval", string(sign(one, skeys[2])))
	r := cer("run", destroy)
	if r.code != 0 {
		t.Fatalf("destroy-root with two approvals: %+v", r)
	}
	keys := regexp.MustCompile(`(?m)^  (hsmd-ceremony\+\S+)$`).FindAllStringSubmatch(r.stdout, -1)
	if len(keys) != 2 {
		t.Fatalf("printed transcript keys: %q", r.stdout)
	}
	vt := []string{"ceremony", "verify-transcript", filepath.Join(dir, "destroy.transcript")}
	for _, k := range keys {
		vt = append(vt, "--key", k[1])
	}
	if r := runCLI(t, "", nil, vt...); r.code != 0 || !strings.Contains(r.stdout, "approved by op1, op3") {
		t.Fatalf("verify-transcript: %+v", r)
	}
	tb, _ := os.ReadFile(filepath.Join(dir, "destroy.transcript"))
	write("destroy.transcript.bad", strings.Replace(string(tb), "sig-ed25519", "sig-ed25518", 1))
	vt[2] = filepath.Join(dir, "destroy.transcript.bad")
	if r := runCLI(t, "", nil, vt...); r.code == 0 {
		t.Fatalf("a changed transcript verifies: %+v", r)
	}

	ad := filepath.Join(data, "audit")
	vkeys, err := audit.ReadVerifiers(ad)
	if err != nil {
		t.Fatal(err)
	}
	vs, err := audit.ParseVerifiers(vkeys)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := audit.Verify(context.Background(), ad, vs)
	if err != nil {
		t.Fatalf("audit verify after the ceremonies: %v", err)
	}
	ops := map[string]int{}
	for e, err := range audit.Entries(context.Background(), ad, 0, rep.Size) {
		if err != nil {
			t.Fatal(err)
		}
		ops[e.Op]++
	}
	// Four started (the destroy-root refused for want of approvals is
	// recorded too), three finished, one approved.
	if ops["ceremony.start"] != 4 || ops["ceremony.finish"] != 3 || ops["ceremony.approved"] != 1 || ops["ceremony.destroy"] != 1 {
		t.Fatalf("ceremony entries in the audit log: %v", ops)
	}
}
