// Package server implements hsmd's gRPC services: Envelope (batched
// encryption), Tenants, and the standard health service, with one
// interceptor that assigns request IDs, maps errors to gRPC codes, logs and
// counts.
//
// The server holds no keys: it resolves tenants from the store and asks the
// envelope Engine, whose Deriver is the HSM, to seal and open.
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"path"
	"runtime"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/internal/bufpool"
	"github.com/hsmd/hsmd/internal/grpccodec"
	"github.com/hsmd/hsmd/quorum"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/store"
)

// Config is what a Server needs. Store, Engine and Metrics are required.
type Config struct {
	Store   store.Store
	Engine  *envelope.Engine
	Metrics *Metrics
	Limits  Limits
	Logger  *slog.Logger
	// KDKVersion is the root key version new tenant versions derive from.
	KDKVersion uint32
	// Ready reports whether the HSM is usable; it drives the health
	// service. Nil means always ready.
	Ready func(context.Context) error
	// TPM reports whether the TPM answers. It does not gate serving (the
	// secrets are unsealed at start); it drives the health of TPMService
	// and hsmd_tpm_up. Nil: no TPM.
	TPM func(context.Context) error
	// InsecureNoTPM: hsmd runs without a TPM (--insecure-no-tpm); shown in
	// health (TPMService NOT_SERVING) and metrics (hsmd_tpm_insecure 1).
	InsecureNoTPM bool
	// Keys, if set, serves the Keys service, Rewrap's rotation-aware
	// checks and ShredTenant (UNIMPLEMENTED without it).
	Keys *rotation.Manager
	// RollbackCounter, if set, is exported as hsmd_rollback_counter.
	RollbackCounter func() uint64
	// Rand draws tenant IDs and salts; default crypto/rand.Reader.
	Rand io.Reader
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Audit, if set, records every call (see auditBefore/auditAfter):
	// fail-closed, a call whose entry cannot be recorded fails with
	// UNAVAILABLE. AuditContexts HMACs the callers' contexts for it.
	Audit         Auditor
	AuditContexts *audit.ContextHasher
	// Quorum, if set, makes ShredTenant and ScheduleDestroy require a
	// quorum-approved request (their approval field), spent in
	// QuorumSpent (required with Quorum).
	Quorum      *quorum.Policy
	QuorumSpent quorum.Spent
	// XWing, if set, serves Keys.GetPublicKey (UNIMPLEMENTED without it);
	// give the same value to envelope.Config.XWing to open suite 0x02.
	XWing *XWingKeys
	// Authz, if set, authorizes every call by its policy before it runs,
	// deny by default (see methodOperation for the operation of each
	// method); a refusal is PERMISSION_DENIED and is audited. Nil allows
	// every call (the dev profile).
	Authz *Authorizer
}

// TPMService is the health service name that reports the TPM: SERVING
// while it answers, NOT_SERVING when it does not or hsmd runs without one.
// The overall status ("") follows the HSM only: the data plane works
// without the TPM once the secrets are unsealed.
const TPMService = "hsmd.tpm"

// Server is hsmd's gRPC front end. It is safe for concurrent use.
type Server struct {
	cfg    Config
	log    *slog.Logger
	health *health.Server
	deks   dekCounts
	limit  *identityLimiter
}

// New checks cfg (Store, Engine and Metrics are required; Limits must
// validate) and returns a Server. The Server does not own the store or the
// engine: the caller closes them after stopping the gRPC server.
func New(cfg Config) (*Server, error) {
	if cfg.Store == nil || cfg.Engine == nil || cfg.Metrics == nil {
		return nil, errors.New("server: Config.Store, Engine and Metrics are required")
	}
	if cfg.Quorum != nil && cfg.QuorumSpent == nil {
		return nil, errors.New("server: Config.QuorumSpent is required with Config.Quorum")
	}
	cfg.Limits = cfg.Limits.WithDefaults()
	if err := cfg.Limits.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.KDKVersion == 0 {
		cfg.KDKVersion = 1
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.InsecureNoTPM {
		cfg.Metrics.tpmInsecure.Set(1)
	}
	if cfg.RollbackCounter != nil {
		cfg.Metrics.registerCounter(cfg.RollbackCounter)
	}
	return &Server{cfg: cfg, log: cfg.Logger, health: health.NewServer(), limit: newIdentityLimiter(cfg.Limits, time.Now)}, nil
}

// ServerOptions returns the grpc.ServerOptions hsmd's services need: the
// interceptor and message size caps. Add credentials and the like to them.
func (s *Server) ServerOptions() []grpc.ServerOption {
	max := s.cfg.Limits.MaxMessageBytes()
	return []grpc.ServerOption{
		grpc.UnaryInterceptor(s.intercept),
		grpc.Creds(PeerCredentials()),
		grpc.MaxRecvMsgSize(max),
		// A response holds the request's items plus 58 bytes each.
		grpc.MaxSendMsgSize(max + s.cfg.Limits.MaxBatchItems*64),
		// Batches are read with their items aliasing one buffer, and
		// messages written into buffers that are not cleared first
		// (internal/grpccodec).
		grpc.ForceServerCodecV2(grpccodec.Codec{}),
		experimental.BufferPool(bufpool.Shared),
		// Calls run on long-lived workers (a new goroutine only when all
		// are busy), whose stacks have grown already: a fresh goroutine
		// per call spends about a tenth of a small call's CPU growing
		// its stack.
		grpc.NumStreamWorkers(uint32(4 * runtime.GOMAXPROCS(0))),
	}
}

// Register adds the services to g.
func (s *Server) Register(g *grpc.Server) {
	hsmdv1.RegisterEnvelopeServer(g, &envelopeService{s: s})
	hsmdv1.RegisterTenantsServer(g, &tenantsService{s: s})
	hsmdv1.RegisterKeysServer(g, &keysService{s: s})
	healthpb.RegisterHealthServer(g, s.health)
}

// Health returns the health service, so the caller can mark the server
// NOT_SERVING while it shuts down.
func (s *Server) Health() *health.Server { return s.health }

// WatchReady polls Ready every interval until ctx is done, and sets the
// health status and the hsmd_ready gauge to match. It returns when ctx is
// done.
func (s *Server) WatchReady(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		s.checkReady(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *Server) checkReady(ctx context.Context) {
	st, v := healthpb.HealthCheckResponse_SERVING, 1.0
	if s.cfg.Ready != nil {
		if err := s.cfg.Ready(ctx); err != nil {
			st, v = healthpb.HealthCheckResponse_NOT_SERVING, 0
			s.log.LogAttrs(ctx, slog.LevelWarn, "not ready", slog.Any("error", err))
		}
	}
	if s.cfg.Audit != nil {
		if err := s.cfg.Audit.Err(); err != nil {
			st, v = healthpb.HealthCheckResponse_NOT_SERVING, 0
			s.log.LogAttrs(ctx, slog.LevelWarn, "not ready: the audit log takes no entries", slog.Any("error", err))
		}
	}
	for _, svc := range []string{"", hsmdv1.Envelope_ServiceDesc.ServiceName, hsmdv1.Tenants_ServiceDesc.ServiceName, hsmdv1.Keys_ServiceDesc.ServiceName} {
		s.health.SetServingStatus(svc, st)
	}
	s.cfg.Metrics.ready.Set(v)
	s.checkTPM(ctx)
}

func (s *Server) checkTPM(ctx context.Context) {
	st, up := healthpb.HealthCheckResponse_NOT_SERVING, 0.0
	if s.cfg.TPM != nil {
		if err := s.cfg.TPM(ctx); err != nil {
			s.log.LogAttrs(ctx, slog.LevelWarn, "the TPM does not answer; serving goes on with the secrets unsealed at start", slog.Any("error", err))
		} else {
			st, up = healthpb.HealthCheckResponse_SERVING, 1
		}
	}
	s.health.SetServingStatus(TPMService, st)
	s.cfg.Metrics.tpmUp.Set(up)
}

type ctxKey struct{}

func requestID(ctx context.Context) string {
	id, _ := ctx.Value(ctxKey{}).(string)
	return id
}

// intercept gives each call a request ID (returned in the x-request-id
// header), authorizes it (Config.Authz), applies the per-identity limits
// (see identityLimiter; health probes are exempt), maps its error to a
// status, and logs and counts it.
func (s *Server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	var b [8]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	ctx = context.WithValue(ctx, ctxKey{}, id)
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-request-id", id))
	method := path.Base(info.FullMethod)
	start := time.Now()
	// Health probes (gRPC health, the KMS plugin's Status, polled by the
	// API server) are not audited: they change nothing, and they must
	// report an audit failure rather than be refused by it.
	// Nor are they subject to the per-identity limits.
	probe := strings.HasPrefix(info.FullMethod, "/grpc.health.") || info.FullMethod == kmsStatusMethod
	audited := s.cfg.Audit != nil && !probe
	var caller string
	var resp any
	err := s.authorizeCall(ctx, info, req)
	if err == nil && !probe {
		var release func()
		if release, err = s.limit.acquire(limitIdentity(ctx)); err == nil {
			defer release()
		}
	}
	if audited && err == nil {
		caller = callerIdentity(ctx)
		err = s.auditBefore(ctx, method, caller, auditRequest(info, req))
	}
	if err == nil {
		resp, err = h(ctx, req)
		err = toStatus(ctx, s.log, err)
		if audited {
			if aerr := s.auditAfter(ctx, method, caller, auditRequest(info, req), resp, status.Code(err)); aerr != nil {
				err = aerr
			}
		}
		if err != nil && resp != nil {
			// Not sent: return a wire form made in advance to its pool.
			grpccodec.Release(resp)
			resp = nil
		}
	}
	d := time.Since(start)
	code := status.Code(err)
	s.cfg.Metrics.requests.WithLabelValues(method, code.String()).Inc()
	s.cfg.Metrics.latency.WithLabelValues(method).Observe(d.Seconds())
	s.log.LogAttrs(ctx, slog.LevelDebug, "rpc", slog.String("method", method), slog.String("code", code.String()),
		slog.Duration("duration", d), slog.String("request_id", id))
	return resp, err
}
