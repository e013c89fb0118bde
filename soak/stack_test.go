package soak_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/audit"
	"github.com/hsmd/hsmd/envelope"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/signing"
	"github.com/hsmd/hsmd/softhsm"
	"github.com/hsmd/hsmd/store/bolt"
)

func TestMain(m *testing.M) {
	audit.QuietTessera()
	os.Exit(softhsm.RunTests(m))
}

// soakSessions is the HSM session pool size: the bound on open sessions.
const soakSessions = 8

// stack is a whole hsmd in process, wired as cmd/hsmd wires it (the
// minimum of server/stack_test.go's helper that a soak needs): a SoftHSM
// token with root keys, a bbolt store, an audit log whose checkpoints the
// token's keys sign, the envelope engine deriving through the HSM, and
// the gRPC services on a unix socket.
type stack struct {
	hsm  *hsm.HSM
	eng  *envelope.Engine
	conn *grpc.ClientConn
	env  hsmdv1.EnvelopeClient
	ten  hsmdv1.TenantsClient
	keys hsmdv1.KeysClient
	stop func()
}

func newStack(t *testing.T) *stack {
	t.Helper()
	ctx := context.Background()
	tok := softhsm.NewTestToken(t)
	dir := t.TempDir()
	h, err := hsm.Open(ctx, hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, Sessions: soakSessions})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(dir, "hsmd.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	log, contexts := openAudit(t, h, filepath.Join(dir, "audit"))
	s := &stack{hsm: h}
	var srv *server.Server
	m := server.NewMetrics(prometheus.NewRegistry(), func() envelope.Stats { return s.eng.Stats() })
	xwing := &server.XWingKeys{Store: st, Wrap: h}
	s.eng, err = envelope.New(envelope.Config{Deriver: m.InstrumentDeriver(h), XWing: xwing,
		// A new seed every 10,000 items: the HSM keeps being asked.
		Limits:    envelope.Limits{MaxItems: 10_000},
		OnSealKey: func(ref envelope.KeyRef) { srv.RecordDEK(ref) }})
	if err != nil {
		t.Fatal(err)
	}
	keys := &rotation.Manager{Store: st, KDKVersion: h.NewestKDK, MinDestroyWait: time.Hour,
		OnChange: func(ctx context.Context, c rotation.Change) error {
			srv.KeyChanged(c)
			for _, v := range c.Versions {
				s.eng.Forget(c.TenantID, v)
			}
			return server.KeyEvent(ctx, log, c.Op, c.Tenant, c.Versions)
		}}
	srv, err = server.New(server.Config{Store: st, Engine: s.eng, Metrics: m, Ready: h.Ready, Keys: keys,
		Audit: log, AuditContexts: contexts, XWing: xwing})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(srv.ServerOptions()...)
	srv.Register(g)
	sock := filepath.Join(dir, "hsmd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	wctx, cancel := context.WithCancel(ctx)
	go srv.WatchReady(wctx, time.Second)
	s.conn, err = grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	s.env, s.ten, s.keys = hsmdv1.NewEnvelopeClient(s.conn), hsmdv1.NewTenantsClient(s.conn), hsmdv1.NewKeysClient(s.conn)
	stopped := false
	s.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		s.conn.Close()
		g.Stop()
		if err := log.Close(context.Background()); err != nil {
			t.Errorf("closing the audit log: %v", err)
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
	return s
}

// openAudit opens an audit log in dir whose checkpoints the token's
// Ed25519 and ECDSA P-256 keys and an ML-DSA-44 key sealed under its wrap
// key sign, as the daemon does.
func openAudit(t *testing.T, h *hsm.HSM, dir string) (*audit.Log, *audit.ContextHasher) {
	t.Helper()
	ctx := context.Background()
	keys, err := audit.LoadKeys(ctx, dir, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer keys.Clear()
	const origin = "hsmd.soak/audit"
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
	l, err := audit.Open(ctx, audit.Config{Dir: dir, Signers: append(signers, ml), CheckpointInterval: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ch, err := audit.NewContextHasher(keys.Context)
	if err != nil {
		t.Fatal(err)
	}
	return l, ch
}
