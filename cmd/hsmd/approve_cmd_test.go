package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hsmd/hsmd/quorum"
)

// runApproveCLI runs `hsmd approve args...` in process.
func runApproveCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	env := &cliEnv{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, getenv: func(string) string { return "" }}
	code = run(context.Background(), env, append([]string{"approve"}, args...))
	return code, out.String(), errb.String()
}

func mustApproveCLI(t *testing.T, args ...string) (stdout, stderr string) {
	t.Helper()
	code, stdout, stderr := runApproveCLI(t, args...)
	if code != 0 {
		t.Fatalf("hsmd approve %s: exit %d\n%s", strings.Join(args, " "), code, stderr)
	}
	return stdout, stderr
}

// approveTeam makes keys for alice (Ed25519), bob (ML-DSA-44) and carol
// (Ed25519) in dir and a 2-of-3 policy, and returns the policy's path.
func approveTeam(t *testing.T, dir string) string {
	t.Helper()
	policy := "threshold: 2\nmax_validity: 72h\noperators:\n"
	for _, o := range []struct {
		name  string
		mldsa bool
	}{{"alice", false}, {"bob", true}, {"carol", false}} {
		args := []string{"keygen", "--name", o.name, "--out", filepath.Join(dir, o.name+".key")}
		if o.mldsa {
			args = append(args, "--mldsa")
		}
		vkey, stderr := mustApproveCLI(t, args...)
		vkey = strings.TrimSpace(vkey)
		if !strings.HasPrefix(vkey, o.name+"+") || strings.Count(vkey, "\n") != 0 {
			t.Fatalf("keygen printed %q", vkey)
		}
		if strings.Contains(stderr, "PRIVATE") {
			t.Fatalf("keygen printed the private key:\n%s", stderr)
		}
		fi, err := os.Stat(filepath.Join(dir, o.name+".key"))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s.key: %v, %v; want mode 0600", o.name, fi, err)
		}
		policy += "  - name: " + o.name + "\n    key: " + vkey + "\n"
	}
	path := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(path, []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestApproveCommandEndToEnd(t *testing.T) {
	dir := t.TempDir()
	policy := approveTeam(t, dir)
	req := filepath.Join(dir, "shred.req")
	_, stderr := mustApproveCLI(t, "new", "--kind", "shred-tenant", "--param", "tenant=billing", "--param", "ticket=OPS-42", "--expires", "24h", "--out", req)
	if !strings.Contains(stderr, "tenant = billing") || !strings.Contains(stderr, "digest:  sha256:") {
		t.Fatalf("new did not show the request:\n%s", stderr)
	}

	// No approvals yet, then one: the threshold of 2 is not met.
	code, stdout, _ := runApproveCLI(t, "verify", req, "--policy", policy)
	if code != 1 || !strings.Contains(stdout, "0 of 2: NOT met") {
		t.Fatalf("verify with no approvals: exit %d\n%s", code, stdout)
	}
	_, stderr = mustApproveCLI(t, req, "--key", filepath.Join(dir, "alice.key"))
	for _, want := range []string{"kind:    shred-tenant", "param:   tenant = billing", "param:   ticket = OPS-42", "digest:  sha256:", "expires: ", "approved as alice"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("approve stderr lacks %q:\n%s", want, stderr)
		}
	}
	code, stdout, stderr = runApproveCLI(t, "verify", req, "--policy", policy)
	if code != 1 || !strings.Contains(stdout, "approved by: alice\n") || !strings.Contains(stdout, "1 of 2: NOT met") ||
		!strings.Contains(stderr, "hsmd: error: quorum: too few approvals: 1 valid of 2 needed") {
		t.Fatalf("verify with one approval: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}

	// bob (ML-DSA) signs into a separate file; the original is unchanged.
	signed := filepath.Join(dir, "shred.signed")
	before, _ := os.ReadFile(req)
	mustApproveCLI(t, req, "--key", filepath.Join(dir, "bob.key"), "--out", signed)
	if after, _ := os.ReadFile(req); !bytes.Equal(before, after) {
		t.Fatal("--out changed the request file")
	}
	stdout, _ = mustApproveCLI(t, "verify", signed, "--policy", policy)
	if !strings.Contains(stdout, "approved by: alice, bob\n") || !strings.Contains(stdout, "2 of 2: met") {
		t.Fatalf("verify with two approvals:\n%s", stdout)
	}

	// The file authorizes exactly this operation, once.
	b, err := os.ReadFile(signed)
	if err != nil {
		t.Fatal(err)
	}
	p, err := quorum.LoadPolicy(policy)
	if err != nil {
		t.Fatal(err)
	}
	op := quorum.Operation{Kind: quorum.KindShredTenant, Params: map[string]string{"tenant": "billing", "ticket": "OPS-42"}}
	spent := quorum.NewFileSpent(filepath.Join(dir, "spent.json"))
	if _, err := p.Authorize(context.Background(), spent, b, op, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authorize(context.Background(), spent, b, op, time.Now()); !errors.Is(err, quorum.ErrReplayed) {
		t.Fatalf("second use: %v, want ErrReplayed", err)
	}
}

func TestApproveCommandMerge(t *testing.T) {
	dir := t.TempDir()
	policy := approveTeam(t, dir)
	req := filepath.Join(dir, "kdk.req")
	mustApproveCLI(t, "new", "--kind", "rotate-kdk", "--expires", "1h", "--out", req)
	for _, name := range []string{"bob", "carol"} {
		mustApproveCLI(t, req, "--key", filepath.Join(dir, name+".key"), "--out", filepath.Join(dir, name+".req"))
	}
	merged := filepath.Join(dir, "merged.req")
	mustApproveCLI(t, "merge", "--out", merged, filepath.Join(dir, "bob.req"), filepath.Join(dir, "carol.req"))
	stdout, _ := mustApproveCLI(t, "verify", merged, "--policy", policy)
	if !strings.Contains(stdout, "approved by: bob, carol\n") {
		t.Fatalf("verify merged:\n%s", stdout)
	}
}

func TestApproveCommandErrors(t *testing.T) {
	dir := t.TempDir()
	policy := approveTeam(t, dir)
	req := filepath.Join(dir, "r.req")
	mustApproveCLI(t, "new", "--kind", "destroy-version", "--param", "key=payments", "--param", "version=3", "--out", req)
	skey, err := os.ReadFile(filepath.Join(dir, "alice.key"))
	if err != nil {
		t.Fatal(err)
	}
	badKey := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(badKey, skey[:len(skey)-10], 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"keygen", "--name", "alice", "--out", filepath.Join(dir, "alice.key")}, 1, "already exists"},
		{[]string{"keygen", "--name", "bad name", "--out", filepath.Join(dir, "x.key")}, 1, "invalid key"},
		{[]string{"new", "--kind", "format-disk", "--out", filepath.Join(dir, "n.req")}, 1, "unknown kind"},
		{[]string{"new", "--kind", "restore", "--expires", "0s", "--out", filepath.Join(dir, "n.req")}, 2, "--expires must be positive"},
		{[]string{"new", "--kind", "restore", "--out", req}, 1, "already exists"},
		{[]string{req}, 2, "want one REQUEST_FILE and --key"},
		{[]string{req, "--key", badKey}, 1, "invalid key"},
		{[]string{filepath.Join(dir, "alice.key"), "--key", badKey}, 1, "malformed approval request"},
		{[]string{"verify", req}, 2, "--policy"},
		{[]string{"verify", req, "--policy", req}, 1, "invalid policy"},
		{[]string{"verify", req, "--policy", policy, "--extra"}, 2, "flag provided but not defined"},
	} {
		code, _, stderr := runApproveCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("hsmd approve %s: exit %d, want %d with %q\n%s", strings.Join(tc.args, " "), code, tc.code, tc.want, stderr)
		}
		if strings.Contains(stderr, string(skey[20:40])) {
			t.Errorf("hsmd approve %s: stderr quotes the private key", strings.Join(tc.args, " "))
		}
	}
	strict := filepath.Join(dir, "strict.yaml")
	p, _ := os.ReadFile(policy)
	if err := os.WriteFile(strict, append([]byte("quorum: 2\n"), p...), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runApproveCLI(t, "verify", req, "--policy", strict); code != 1 || !strings.Contains(stderr, "field quorum not found") {
		t.Errorf("policy with an unknown key: exit %d\n%s", code, stderr)
	}
}
