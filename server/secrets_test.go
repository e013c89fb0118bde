package server_test

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/internal/testutil"
	"github.com/hsmd/hsmd/server"
)

// The marker secrets: a caller's plaintext and context values.
const (
	markerPlaintext = "MARKER-PLAINTEXT-7f3a"
	markerContext   = "MARKER-CONTEXT-9c1e"
)

// findSecrets returns a description of each secret found in text.
func findSecrets(where, text string, secrets map[string]string) []string {
	var found []string
	for name, v := range secrets {
		if strings.Contains(text, v) {
			found = append(found, fmt.Sprintf("%s holds the %s", where, name))
		}
	}
	return found
}

// TestNoSecretsInLogsErrorsOrMetrics runs successful and failing calls
// (bad and tampered ciphertexts, another tenant's key, another context,
// over-limit items and contexts, over-rate calls, permission denied) whose
// payloads and contexts carry marker secrets, with debug logging, and
// checks that neither the markers nor the token's user PIN appear in any
// log line, returned error message (item errors included), the metrics
// exposition, or the audit log.
func TestNoSecretsInLogsErrorsOrMetrics(t *testing.T) {
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	allOps := "[encrypt, decrypt, rewrap, public-key, key-admin, tenant-admin]"
	if err := os.WriteFile(policy, fmt.Appendf(nil, "principals:\n  - name: me\n    match: [\"uid:%d\"]\n    tenants: [acme, other]\n    operations: %s\n", os.Getuid(), allOps), 0o600); err != nil {
		t.Fatal(err)
	}
	azReg := prometheus.NewRegistry()
	var logs testutil.SyncBuffer
	az, err := server.NewAuthorizer(policy, azReg, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, stackOpts{log: &logs, audit: true, authz: az,
		limits: server.Limits{MaxItemBytes: 1024, MaxContextBytes: 256, RatePerIdentity: 1, BurstPerIdentity: 30}})
	pin, err := os.ReadFile(s.tok.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{"marker plaintext": markerPlaintext, "marker context": markerContext,
		"user PIN": strings.TrimSpace(string(pin))}
	if len(secrets["user PIN"]) < 8 {
		t.Fatalf("the user PIN is too short (%d) to search for", len(secrets["user PIN"]))
	}

	ctx := context.Background()
	var msgs []string
	call := func(err error) {
		if err != nil {
			msgs = append(msgs, status.Convert(err).Message())
		}
	}
	results := func(resp *hsmdv1.DecryptResponse, err error) {
		call(err)
		for _, r := range resp.GetResults() {
			if r.Error != nil {
				msgs = append(msgs, r.Error.Message, r.Error.Reason)
			}
		}
	}
	s.createTenant("acme")
	s.createTenant("other")
	mctx := map[string]string{"purpose": markerContext, markerContext: "key"}
	pt := []byte(markerPlaintext)
	cts := encrypt(t, s, "acme", &hsmdv1.EncryptItem{Plaintext: pt, Context: mctx})
	ct := cts[0]
	// Success.
	results(s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "acme", Items: []*hsmdv1.DecryptItem{{Ciphertext: ct, Context: mctx}}}))
	// Not a ciphertext, tampered, another context, another tenant.
	tampered := bytes.Clone(ct)
	tampered[len(tampered)-1] ^= 1
	results(s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "acme", Items: []*hsmdv1.DecryptItem{
		{Ciphertext: pt, Context: mctx},
		{Ciphertext: []byte("hsmd:" + markerPlaintext), Context: mctx},
		{Ciphertext: tampered, Context: mctx},
		{Ciphertext: ct, Context: map[string]string{"purpose": markerContext + "x"}},
		{Ciphertext: ct},
	}}))
	results(s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "other", Items: []*hsmdv1.DecryptItem{{Ciphertext: ct, Context: mctx}}}))
	results(s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "nobody", Items: []*hsmdv1.DecryptItem{{Ciphertext: ct, Context: mctx}}}))
	// Over the limits.
	big := bytes.Repeat(pt, 100)
	_, err = s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{{Plaintext: big, Context: mctx}}})
	call(err)
	_, err = s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{{Plaintext: pt, Context: map[string]string{"k": string(big)}}}})
	call(err)
	results(s.env.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "acme", Items: []*hsmdv1.DecryptItem{{Ciphertext: big, Context: mctx}}}))
	// Rewrap, and of a tampered ciphertext.
	rw, err := s.env.Rewrap(ctx, &hsmdv1.RewrapRequest{Tenant: "acme", Items: []*hsmdv1.DecryptItem{{Ciphertext: ct, Context: mctx}, {Ciphertext: tampered, Context: mctx}}})
	call(err)
	for _, r := range rw.GetResults() {
		if r.Error != nil {
			msgs = append(msgs, r.Error.Message, r.Error.Reason)
		}
	}
	// Permission denied: the TCP caller has no identity the policy matches.
	tcpEnv := hsmdv1.NewEnvelopeClient(s.tcp)
	_, err = tcpEnv.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{{Plaintext: pt, Context: mctx}}})
	call(err)
	results(tcpEnv.Decrypt(ctx, &hsmdv1.DecryptRequest{Tenant: "acme", Items: []*hsmdv1.DecryptItem{{Ciphertext: ct, Context: mctx}}}))
	// Over the rate: the burst of 30 is spent within the loop.
	limited := 0
	for range 40 {
		_, err := s.env.Encrypt(ctx, &hsmdv1.EncryptRequest{Tenant: "acme", Items: []*hsmdv1.EncryptItem{{Plaintext: pt, Context: mctx}}})
		if err != nil {
			limited++
			call(err)
			break
		}
	}
	if limited != 1 {
		t.Fatal("no call was over the rate")
	}
	if len(msgs) < 10 {
		t.Fatalf("only %d error messages collected: the failing calls did not fail", len(msgs))
	}

	rec := httptest.NewRecorder()
	promhttp.HandlerFor(prometheus.Gatherers{s.reg, azReg}, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	metrics := rec.Body.String()
	if !strings.Contains(metrics, "hsmd_") {
		t.Fatalf("the metrics exposition holds no hsmd metric:\n%s", metrics)
	}
	s.stop() // flushes the audit log
	log := logs.String()
	if !strings.Contains(log, "level=DEBUG") {
		t.Fatal("no debug log line was captured")
	}
	var audit strings.Builder
	filepath.WalkDir(filepath.Join(s.dir, "audit"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			b, _ := os.ReadFile(p)
			audit.Write(b)
		}
		return nil
	})
	if audit.Len() == 0 {
		t.Fatal("the audit log is empty")
	}

	var found []string
	for _, line := range strings.Split(log, "\n") {
		found = append(found, findSecrets("log line "+fmt.Sprintf("%q", line), line, secrets)...)
	}
	for _, m := range msgs {
		found = append(found, findSecrets(fmt.Sprintf("error message %q", m), m, secrets)...)
	}
	found = append(found, findSecrets("the metrics exposition", metrics, secrets)...)
	found = append(found, findSecrets("the audit log", audit.String(), secrets)...)
	for _, f := range found {
		t.Error(f)
	}
	// The search itself finds a planted secret.
	if len(findSecrets("x", "a "+markerContext+" b", secrets)) != 1 {
		t.Fatal("findSecrets misses a marker")
	}
	t.Logf("%d log bytes, %d error messages, %d metrics bytes, %d audit bytes searched; %d over-rate", len(log), len(msgs), len(metrics), audit.Len(), limited)
}
