package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDevServerAuthz: `hsmd serve --dev` with an authz policy. The CLI
// presents the dev client certificate on TCP by default (identity
// devClientID) and is known by its uid on the unix socket; each gets what
// the policy allows and PERMISSION_DENIED otherwise; a TCP client without
// a certificate, or with one from another CA, is refused at the
// handshake. A changed policy takes effect on SIGHUP without a restart; an
// invalid one keeps the old policy and counts in the reload-errors metric.
// Denials are audit entries naming the caller.
func TestDevServerAuthz(t *testing.T) {
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.yaml")
	uid := fmt.Sprintf("uid:%d", os.Getuid())
	writePolicy := func(cliTenants string) {
		t.Helper()
		p := fmt.Sprintf(`principals:
  - name: cli
    match: [%q]
    tenants: [%s]
    operations: [encrypt, decrypt]
  - name: admin
    match: [%q]
    tenants: ["*"]
    operations: [tenant-admin]
`, devClientID, cliTenants, uid)
		if err := os.WriteFile(policy+".tmp", []byte(p), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(policy+".tmp", policy); err != nil {
			t.Fatal(err)
		}
	}
	writePolicy(`"demo"`)
	if err := os.WriteFile(filepath.Join(dir, "hsmd.yaml"), []byte("authz:\n  policy: "+policy+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := serveCmd(t, dir)
	cmd.Args = append(cmd.Args, "--config", "hsmd.yaml")
	d := startDaemon(t, cmd)
	m := tcpLine.FindStringSubmatch(d.out.String())
	if m == nil {
		t.Fatalf("no TLS TCP listener announced:\n%s", d.out)
	}
	addr := m[1]
	denied := func(errOut string, err error, what string) {
		t.Helper()
		if err == nil || !strings.Contains(errOut, "permission denied") {
			t.Fatalf("%s: not denied: %v %s", what, err, errOut)
		}
	}

	// The unix socket: uid may administer tenants, not encrypt.
	mustCLI(t, dir, "", "tenants", "create", "demo")
	mustCLI(t, dir, "", "tenants", "create", "other")
	_, errOut, err := cli(t, dir, "x", "encrypt", "--tenant", "demo")
	denied(errOut, err, "encrypt over the unix socket")

	// TCP with the dev client certificate: encrypt and decrypt on demo only.
	text := mustCLI(t, dir, "hello", "encrypt", "--addr", addr, "--tenant", "demo", "--text")
	if pt := mustCLI(t, dir, text, "decrypt", "--addr", addr, "--tenant", "demo"); pt != "hello" {
		t.Fatalf("decrypted %q", pt)
	}
	_, errOut, err = cli(t, dir, "x", "encrypt", "--addr", addr, "--tenant", "other")
	denied(errOut, err, "encrypt on another tenant")
	if !strings.Contains(errOut, devClientID) || !strings.Contains(errOut, `"other"`) {
		t.Fatalf("the denial does not name the caller and tenant: %s", errOut)
	}
	_, errOut, err = cli(t, dir, "", "tenants", "create", "--addr", addr, "third")
	denied(errOut, err, "tenant-admin over TCP")

	// No client certificate (a directory without the dev files, trusting
	// the dev CA), or one from another CA: refused at the handshake.
	elsewhere := t.TempDir()
	ca := filepath.Join(dir, "var", "tls", "ca.pem")
	if _, errOut, err := cli(t, elsewhere, "x", "encrypt", "--addr", addr, "--tls-ca", ca, "--tenant", "demo", "--timeout", "5s"); err == nil {
		t.Fatal("a client without a certificate was served")
	} else if strings.Contains(errOut, "permission denied") {
		t.Fatalf("refused after the handshake, not at it: %s", errOut)
	}
	other := devPKIAt(t.TempDir())
	if err := other.issue(time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, errOut, err := cli(t, elsewhere, "x", "encrypt", "--addr", addr, "--tls-ca", ca, "--tls-cert", other.clientCert,
		"--tls-key", other.clientKey, "--tenant", "demo", "--timeout", "5s"); err == nil {
		t.Fatal("a client certificate of another CA was accepted")
	} else if strings.Contains(errOut, "permission denied") {
		t.Fatalf("refused after the handshake, not at it: %s", errOut)
	}

	// Reload on SIGHUP: cli may now use "other" too.
	writePolicy(`"demo", "other"`)
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	auditWaitFor(t, "the reloaded policy", func() bool {
		_, _, err := cli(t, dir, "x", "encrypt", "--addr", addr, "--tenant", "other")
		return err == nil
	})
	// An invalid file keeps the policy in force, and is counted.
	if err := os.WriteFile(policy, []byte("principals: [{name: x, operations: [fly]}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	reloadErrors := regexp.MustCompile(`(?m)^hsmd_authz_policy_reload_errors_total [1-9]`)
	auditWaitFor(t, "the refused reload in the metrics", func() bool { return reloadErrors.MatchString(scrape(t, d.metrics)) })
	mustCLI(t, dir, "x", "encrypt", "--addr", addr, "--tenant", "other")
	_, errOut, err = cli(t, dir, "x", "encrypt", "--tenant", "demo")
	denied(errOut, err, "encrypt over the unix socket after a refused reload")
	if !strings.Contains(d.out.String(), "policy") {
		t.Fatalf("the refused reload is not logged:\n%s", d.out)
	}

	// Denials are counted per method and code, and audited with the caller.
	if !regexp.MustCompile(`hsmd_requests_total\{code="PermissionDenied",method="Encrypt"\} [3-9]`).MatchString(scrape(t, d.metrics)) {
		t.Fatalf("denials not counted:\n%s", grepLines(scrape(t, d.metrics), "PermissionDenied"))
	}
	auditWaitFor(t, "the denials in the audit log", func() bool {
		out, _, err := cli(t, dir, "", "audit", "tail", "--data-dir", "var", "-n", "1000")
		return err == nil && strings.Count(out, "PERMISSION_DENIED") >= 4 && strings.Contains(out, devClientID) && strings.Contains(out, fmt.Sprintf("unix:uid=%d,", os.Getuid()))
	})
}
