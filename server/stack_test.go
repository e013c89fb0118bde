package server_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/internal/bufpool"
	"github.com/hsmd/hsmd/internal/grpccodec"
	"github.com/hsmd/hsmd/quorum"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/signing"
	"github.com/hsmd/hsmd/softhsm"
	"github.com/hsmd/hsmd/store"
	"github.com/hsmd/hsmd/store/bolt"
)

func TestMain(m *testing.M) { os.Exit(softhsm.RunTests(m)) }

// stack is a whole hsmd in process on a real SoftHSM token, served on a
// unix socket in a temp dir and on a loopback TCP port.
type stack struct {
	t       testing.TB
	tok     softhsm.TestToken
	dir     string
	hsm     *hsm.HSM
	reg     *prometheus.Registry
	conn    *grpc.ClientConn
	tcp     *grpc.ClientConn // loopback TCP, as the unix socket
	tcpAddr string
	sock    string
	env     hsmdv1.EnvelopeClient
	tenants hsmdv1.TenantsClient
	keys    hsmdv1.KeysClient
	sched   *rotation.Scheduler
	audit   *audit.Log
	vkeys   []string // the audit checkpoints' verifier keys
	srv     *server.Server
	clock   *fakeClock
	stop    func()
}

// fakeClock is the injected clock of the key manager and scheduler.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

type stackOpts struct {
	wrap   func(hsm.Module) hsm.Module
	hsmCfg func(*hsm.Config)
	limits server.Limits
	log    io.Writer // debug-level log output, if set
	// envelope limits the data keys (to force new seeds in tests).
	envelope envelope.Limits
	// audit records every call in an audit log under <dir>/audit, its
	// checkpoints signed by the token's keys (auditSync: durably).
	audit, auditSync bool
	// quorum, if set, requires approvals for destructive calls.
	quorum *quorum.Policy
	// authz, if set, authorizes every call.
	authz *server.Authorizer
	// creds, if set, replace the server's transport credentials.
	creds credentials.TransportCredentials
}

// newStack makes a token with root keys and starts a stack on it.
func newStack(t testing.TB, o stackOpts) *stack {
	t.Helper()
	s := &stack{t: t, tok: softhsm.NewTestToken(t), dir: t.TempDir()}
	h := s.openHSM(o)
	if err := h.InitKeys(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.Close()
	s.start(o)
	return s
}

func (s *stack) hsmConfig(o stackOpts) hsm.Config {
	c := hsm.Config{Module: s.tok.Module, TokenLabel: s.tok.Label, PINFile: s.tok.PINFile, CallTimeout: 2 * time.Second}
	if o.hsmCfg != nil {
		o.hsmCfg(&c)
	}
	return c
}

func (s *stack) openHSM(o stackOpts) *hsm.HSM {
	s.t.Helper()
	h, err := hsm.OpenWithModuleWrapper(context.Background(), s.hsmConfig(o), o.wrap)
	if err != nil {
		s.t.Fatal(err)
	}
	return h
}

// start opens the HSM and store and serves; restart is stop then start.
func (s *stack) start(o stackOpts) {
	t := s.t
	t.Helper()
	ctx := context.Background()
	h := s.openHSM(o)
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	bst, err := bolt.Open(filepath.Join(s.dir, "hsmd.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := store.NewCached(bst) // as the daemon does
	reg := prometheus.NewRegistry()
	var eng *envelope.Engine
	m := server.NewMetrics(reg, func() envelope.Stats { return eng.Stats() })
	var srv *server.Server
	xwing := &server.XWingKeys{Store: st, Wrap: h}
	ec := envelope.Config{Deriver: m.InstrumentDeriver(h), Limits: o.envelope, OnSealKey: func(ref envelope.KeyRef) { srv.RecordDEK(ref) }, XWing: xwing}
	if eng, err = envelope.New(ec); err != nil {
		t.Fatal(err)
	}
	if s.clock == nil {
		s.clock = &fakeClock{now: time.Now()}
	}
	var auditor server.Auditor
	var contexts *audit.ContextHasher
	if o.audit {
		s.audit, contexts = s.openAudit(h, o.auditSync)
		auditor = s.audit
	}
	keys := &rotation.Manager{Store: st, Now: s.clock.Now, KDKVersion: h.NewestKDK, MinDestroyWait: time.Hour,
		OnChange: func(ctx context.Context, c rotation.Change) error {
			srv.KeyChanged(c)
			for _, v := range c.Versions {
				eng.Forget(c.TenantID, v)
			}
			return server.KeyEvent(ctx, auditor, c.Op, c.Tenant, c.Versions)
		}}
	s.sched = &rotation.Scheduler{Manager: keys}
	var logger *slog.Logger
	if o.log != nil {
		logger = slog.New(slog.NewTextHandler(o.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	srv, err = server.New(server.Config{Store: st, Engine: eng, Metrics: m, Limits: o.limits, Ready: h.Ready, Logger: logger, Keys: keys, Now: s.clock.Now,
		Audit: auditor, AuditContexts: contexts, Quorum: o.quorum, QuorumSpent: quorum.NewFileSpent(filepath.Join(s.dir, "spent.json")), XWing: xwing, Authz: o.authz})
	if err != nil {
		t.Fatal(err)
	}
	opts := srv.ServerOptions()
	if o.creds != nil {
		opts = append(opts, grpc.Creds(o.creds))
	}
	g := grpc.NewServer(opts...)
	srv.Register(g)
	sock := filepath.Join(s.dir, "hsmd.sock")
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(tl)
	wctx, cancel := context.WithCancel(ctx)
	go srv.WatchReady(wctx, 50*time.Millisecond)
	dial := func(target string) *grpc.ClientConn {
		c, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20),
				grpc.ForceCodecV2(grpccodec.Codec{})), experimental.WithBufferPool(bufpool.Shared))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	conn, tconn := dial("unix://"+sock), dial(tl.Addr().String())
	s.hsm, s.reg, s.conn, s.tcp, s.srv = h, reg, conn, tconn, srv
	s.tcpAddr, s.sock = tl.Addr().String(), sock
	s.env, s.tenants, s.keys = hsmdv1.NewEnvelopeClient(conn), hsmdv1.NewTenantsClient(conn), hsmdv1.NewKeysClient(conn)
	stopped := false
	s.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		conn.Close()
		tconn.Close()
		g.Stop()
		if s.audit != nil {
			if err := s.audit.Close(context.Background()); err != nil {
				t.Errorf("closing the audit log: %v", err)
			}
		}
		st.Close()
		if err := h.Close(); err != nil {
			t.Errorf("closing the HSM: %v", err)
		}
		if n := h.OpenSessions(); n != 0 {
			t.Errorf("%d PKCS#11 sessions left open after Close", n)
		}
	}
	t.Cleanup(s.stop)
}

// openAudit opens the stack's audit log, its checkpoints signed by the
// token's Ed25519 and ECDSA P-256 keys and by an ML-DSA-44 key sealed under
// its wrap key, as the daemon does.
func (s *stack) openAudit(h *hsm.HSM, syncMode bool) (*audit.Log, *audit.ContextHasher) {
	t := s.t
	t.Helper()
	ctx := context.Background()
	dir := filepath.Join(s.dir, "audit")
	keys, err := audit.LoadKeys(ctx, dir, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer keys.Clear()
	const origin = "hsmd.test/audit"
	var signers []note.Signer
	for _, alg := range []hsm.SignAlg{hsm.Ed25519, hsm.ECDSAP256} {
		cs, err := h.Signer(ctx, alg)
		if err != nil {
			t.Fatal(err)
		}
		ns, err := signing.NewNoteSigner(origin, cs)
		if err != nil {
			t.Fatal(err)
		}
		signers = append(signers, ns)
	}
	ml, err := signing.NewMLDSASigner(origin, keys.MLDSA)
	if err != nil {
		t.Fatal(err)
	}
	signers = append(signers, ml)
	s.vkeys = audit.VerifierKeys(signers)
	l, err := audit.Open(ctx, audit.Config{Dir: dir, Signers: signers, Sync: syncMode, Timeout: time.Second, CheckpointInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ch, err := audit.NewContextHasher(keys.Context)
	if err != nil {
		t.Fatal(err)
	}
	return l, ch
}

func (s *stack) restart(o stackOpts) {
	s.stop()
	s.start(o)
}

// hsmCalls is the metric the issue counts: HSM HMAC calls.
func (s *stack) hsmCalls() float64 {
	return metricValue(s.t, s.reg, "hsmd_hsm_calls_total", map[string]string{"op": "hmac"})
}

func (s *stack) createTenant(name string) *hsmdv1.Tenant {
	s.t.Helper()
	tn, err := s.tenants.CreateTenant(context.Background(), &hsmdv1.CreateTenantRequest{Name: name})
	if err != nil {
		s.t.Fatal(err)
	}
	return tn
}
