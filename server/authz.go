package server

// Authorization: a per-tenant policy of which callers may call what,
// deny by default, reloaded while serving.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"gopkg.in/yaml.v3"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
)

// Operation is what a policy grants; each gRPC method maps to one (see
// methodOperation).
type Operation string

// The operations. OpDataKey and OpAuditRead name calls to come: a policy
// may grant them, no method needs them yet.
const (
	OpEncrypt     Operation = "encrypt"      // Envelope.Encrypt, KMS v2 Encrypt and Status
	OpDecrypt     Operation = "decrypt"      // Envelope.Decrypt, KMS v2 Decrypt
	OpRewrap      Operation = "rewrap"       // Envelope.Rewrap
	OpDataKey     Operation = "datakey"      // reserved
	OpPublicKey   Operation = "public-key"   // Keys.GetPublicKey
	OpKeyAdmin    Operation = "key-admin"    // every other Keys method, GetKey included
	OpTenantAdmin Operation = "tenant-admin" // every Tenants method
	OpAuditSign   Operation = "audit-sign"   // Audit.SignCheckpoint
	OpAuditRead   Operation = "audit-read"   // reserved
)

var operations = []Operation{OpEncrypt, OpDecrypt, OpRewrap, OpDataKey, OpPublicKey, OpKeyAdmin, OpTenantAdmin, OpAuditSign, OpAuditRead}

// MaxPolicySize bounds a policy file.
const MaxPolicySize = 1 << 20

// ErrPolicy is the error of an invalid policy file.
var ErrPolicy = errors.New("authz policy")

// Policy is the authorization policy (YAML, strict). A call is allowed
// only if some principal matches one of the caller's identities, grants
// the call's operation and, for a call on a tenant, matches the tenant.
// A Policy is immutable once parsed and safe for concurrent use.
type Policy struct {
	Principals []Principal `yaml:"principals"`
}

// Principal grants operations on tenants to the identities it matches.
type Principal struct {
	Name string `yaml:"name"`
	// Match lists exact identities: "spiffe://…" (or any URI: a client
	// certificate's first URI SAN), "cn:NAME" (a client certificate
	// without URI SAN), "uid:N" or "gid:N" (a unix socket caller).
	Match []string `yaml:"match"`
	// Tenants are names or path.Match patterns ("billing-*"). A call
	// without a tenant (a Decrypt whose tenant field is empty) needs "*".
	Tenants    []string    `yaml:"tenants"`
	Operations []Operation `yaml:"operations"`
}

// ParsePolicy parses and validates a policy. Its errors match ErrPolicy
// and name the YAML path of the problem.
func ParsePolicy(b []byte) (*Policy, error) {
	if len(b) > MaxPolicySize {
		return nil, fmt.Errorf("%w: over %d bytes", ErrPolicy, MaxPolicySize)
	}
	var p Policy
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&p); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: %w", ErrPolicy, err)
	}
	if err := p.validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicy, err)
	}
	return &p, nil
}

// LoadPolicy reads and parses the policy file at name (see ParsePolicy).
func LoadPolicy(name string) (*Policy, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicy, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxPolicySize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicy, err)
	}
	return ParsePolicy(b)
}

func (p *Policy) validate() error {
	names := map[string]bool{}
	for i, pr := range p.Principals {
		at := fmt.Sprintf("principals[%d]", i)
		switch {
		case pr.Name == "":
			return fmt.Errorf("%s.name is required", at)
		case names[pr.Name]:
			return fmt.Errorf("%s.name %q is not unique", at, pr.Name)
		case len(pr.Match) == 0 || len(pr.Tenants) == 0 || len(pr.Operations) == 0:
			return fmt.Errorf("%s (%s): match, tenants and operations are required", at, pr.Name)
		}
		names[pr.Name] = true
		for j, m := range pr.Match {
			if !validIdentity(m) {
				return fmt.Errorf("%s.match[%d] %q is not spiffe://…, another URI, cn:NAME, uid:N or gid:N", at, j, m)
			}
		}
		for j, t := range pr.Tenants {
			if _, err := path.Match(t, ""); err != nil || t == "" {
				return fmt.Errorf("%s.tenants[%d] %q is not a tenant name or pattern", at, j, t)
			}
		}
		for j, o := range pr.Operations {
			if !slices.Contains(operations, o) {
				return fmt.Errorf("%s.operations[%d] %q is not an operation (%v)", at, j, o, operations)
			}
		}
	}
	return nil
}

func validIdentity(m string) bool {
	for _, pre := range []string{"uid:", "gid:"} {
		if n, ok := strings.CutPrefix(m, pre); ok {
			_, err := strconv.ParseUint(n, 10, 32)
			return err == nil
		}
	}
	if n, ok := strings.CutPrefix(m, "cn:"); ok {
		return n != ""
	}
	scheme, rest, ok := strings.Cut(m, "://")
	return ok && scheme != "" && rest != "" && !strings.ContainsAny(scheme, "/:")
}

// Allow reports whether a caller with the identities ids may perform op,
// on tenant if scoped. An empty tenant matches only the pattern "*".
func (p *Policy) Allow(ids []string, op Operation, tenant string, scoped bool) bool {
	for _, pr := range p.Principals {
		if !slices.Contains(pr.Operations, op) || !slices.ContainsFunc(pr.Match, func(m string) bool { return slices.Contains(ids, m) }) {
			continue
		}
		if !scoped || slices.ContainsFunc(pr.Tenants, func(t string) bool { return tenantMatch(t, tenant) }) {
			return true
		}
	}
	return false
}

func tenantMatch(pattern, tenant string) bool {
	if tenant == "" {
		return pattern == "*"
	}
	ok, err := path.Match(pattern, tenant)
	return err == nil && ok
}

// methodOperation maps a call to its operation and tenant. scoped is
// false for calls on no tenant (ListTenants, SignCheckpoint); free is true
// for calls every caller may make (health). An unknown method maps to "":
// denied.
func methodOperation(info *grpc.UnaryServerInfo, req any) (op Operation, tenant string, scoped, free bool) {
	svc, method := path.Split(info.FullMethod)
	if k, ok := info.Server.(*kmsService); ok {
		switch method {
		case "Encrypt", "Status":
			return OpEncrypt, k.tenant, true, false
		case "Decrypt":
			return OpDecrypt, k.tenant, true, false
		}
		return "", k.tenant, true, false
	}
	switch {
	case strings.HasPrefix(svc, "/grpc.health."):
		return "", "", false, true
	case svc == "/"+hsmdv1.Envelope_ServiceDesc.ServiceName+"/":
		op = map[string]Operation{"Encrypt": OpEncrypt, "Decrypt": OpDecrypt, "Rewrap": OpRewrap}[method]
	case svc == "/"+hsmdv1.Keys_ServiceDesc.ServiceName+"/":
		op = OpKeyAdmin
		if method == "GetPublicKey" {
			op = OpPublicKey
		}
	case svc == "/"+hsmdv1.Tenants_ServiceDesc.ServiceName+"/":
		op = OpTenantAdmin
	case svc == "/"+hsmdv1.Audit_ServiceDesc.ServiceName+"/" && method == "SignCheckpoint":
		return OpAuditSign, "", false, false
	}
	tenant, scoped = requestTenant(req)
	return op, tenant, scoped, false
}

// requestTenant is the tenant a request names (as describeRequest).
func requestTenant(req any) (string, bool) {
	switch r := req.(type) {
	case interface{ GetTenant() string }:
		return r.GetTenant(), true
	case interface{ GetName() string }: // CreateTenant, GetTenant, ShredTenant
		return r.GetName(), true
	}
	return "", false
}

// authorizeCall refuses the call with PERMISSION_DENIED unless the policy (if
// any) allows it, and records a refusal in the audit log.
func (s *Server) authorizeCall(ctx context.Context, info *grpc.UnaryServerInfo, req any) error {
	if s.cfg.Authz == nil {
		return nil
	}
	op, tenant, scoped, free := methodOperation(info, req)
	if free {
		return nil
	}
	ids := matchIdentities(ctx)
	if op != "" && s.cfg.Authz.Policy().Allow(ids, op, tenant, scoped) {
		return nil
	}
	caller := callerIdentity(ctx)
	method := path.Base(info.FullMethod)
	if op == "" {
		op = "unknown"
	}
	msg := fmt.Sprintf("%s may not %s", caller, op)
	if scoped {
		msg += fmt.Sprintf(" on tenant %q", clip(tenant, 64))
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "permission denied", slog.String("caller", caller), slog.String("operation", string(op)),
		slog.String("tenant", clip(tenant, 64)), slog.String("method", method), slog.String("request_id", requestID(ctx)))
	if a := s.cfg.Audit; a != nil {
		e := audit.Entry{Kind: audit.KindRPC, RequestID: requestID(ctx), Caller: caller, Method: method, Code: codeName(codes.PermissionDenied)}
		s.describeRequest(&e, auditRequest(info, req))
		if err := a.Append(context.WithoutCancel(ctx), e, false); err != nil {
			s.log.LogAttrs(ctx, slog.LevelError, "audit log refused a denial entry", slog.String("request_id", requestID(ctx)), slog.Any("error", err))
		}
	}
	return status.Error(codes.PermissionDenied, "permission denied: "+msg)
}

// Authorizer holds the current Policy of a file and reloads it (Reload,
// Watch). It is safe for concurrent use.
type Authorizer struct {
	file    string
	log     *slog.Logger
	errs    prometheus.Counter
	loaded  prometheus.Gauge
	now     func() time.Time
	current atomic.Pointer[Policy]

	mu    sync.Mutex
	stamp fileStamp
}

type fileStamp struct {
	mod  time.Time
	size int64
}

// NewAuthorizer loads the policy file (it fails if the file is invalid,
// with an error matching ErrPolicy) and registers
// hsmd_authz_policy_reload_errors_total and
// hsmd_authz_policy_loaded_timestamp_seconds with reg. log may be nil.
func NewAuthorizer(file string, reg prometheus.Registerer, log *slog.Logger) (*Authorizer, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Authorizer{file: file, log: log, now: time.Now,
		errs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hsmd_authz_policy_reload_errors_total", Help: "Authorization policy reloads refused (the previous policy stays in force).",
		}),
		loaded: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmd_authz_policy_loaded_timestamp_seconds", Help: "When the authorization policy in force was loaded (Unix time).",
		}),
	}
	if err := a.load(); err != nil {
		return nil, err
	}
	reg.MustRegister(a.errs, a.loaded)
	return a, nil
}

// Policy returns the policy in force.
func (a *Authorizer) Policy() *Policy { return a.current.Load() }

func (a *Authorizer) load() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var st fileStamp
	if fi, err := os.Stat(a.file); err == nil {
		st = fileStamp{fi.ModTime(), fi.Size()}
	}
	p, err := LoadPolicy(a.file)
	if err != nil {
		return err
	}
	a.current.Store(p)
	a.stamp = st
	a.loaded.Set(float64(a.now().UnixNano()) / 1e9)
	return nil
}

// Reload reads the file again: a valid policy replaces the one in force;
// an invalid one is logged at error level, counted, and returned (matching
// ErrPolicy), and the policy in force stays.
func (a *Authorizer) Reload() error {
	if err := a.load(); err != nil {
		a.errs.Inc()
		a.log.Error("authorization policy not reloaded; the previous policy stays in force", slog.String("file", a.file), slog.Any("error", err))
		return err
	}
	a.log.Info("authorization policy loaded", slog.String("file", a.file))
	return nil
}

// Watch reloads the policy whenever the file's modification time or size
// changes (checked every interval) or a value arrives on hup (SIGHUP; may
// be nil), until ctx is done.
func (a *Authorizer) Watch(ctx context.Context, interval time.Duration, hup <-chan os.Signal) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			a.Reload()
		case <-t.C:
			if a.changed() {
				a.Reload()
			}
		}
	}
}

func (a *Authorizer) changed() bool {
	fi, err := os.Stat(a.file)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		gone := a.stamp != fileStamp{}
		a.stamp = fileStamp{}
		return gone
	}
	st := fileStamp{fi.ModTime(), fi.Size()}
	if st.mod.Equal(a.stamp.mod) && st.size == a.stamp.size {
		return false
	}
	a.stamp = st // a bad file is reported once per change
	return true
}
