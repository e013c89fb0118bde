package server_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/transparency-dev/formats/log"
	tnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/merkle/testonly"
	"golang.org/x/mod/sumdb/note"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
	"github.com/hsmd/hsmd/hsm"
	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/signing"
	"github.com/hsmd/hsmd/softhsm"
)

const (
	testOrigin  = "example.com/hsmd/testlog"
	witnessName = "example.com/hsmd/witness"
)

// cosigTime is the fixed clock of the software cosigners.
var cosigTime = time.Unix(1_760_000_000, 0)

// testLog is an in-memory RFC 6962 tree with an Ed25519 note key.
type testLog struct {
	t      testing.TB
	tree   *testonly.Tree
	signer note.Signer
	vkey   note.Verifier
}

func newTestLog(t testing.TB, prefix string, n int) *testLog {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rand.Reader, testOrigin)
	if err != nil {
		t.Fatal(err)
	}
	s, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(vkey)
	if err != nil {
		t.Fatal(err)
	}
	l := &testLog{t: t, tree: testonly.New(rfc6962.DefaultHasher), signer: s, vkey: v}
	for i := range n {
		l.tree.AppendData(fmt.Appendf(nil, "%s entry %d", prefix, i))
	}
	return l
}

// checkpoint returns the log's signed checkpoint at size, with extension
// lines ext after the root hash.
func (l *testLog) checkpoint(size uint64, ext ...string) []byte {
	l.t.Helper()
	body := string(log.Checkpoint{Origin: testOrigin, Size: size, Hash: l.tree.HashAt(size)}.Marshal())
	for _, e := range ext {
		body += e + "\n"
	}
	msg, err := note.Sign(&note.Note{Text: body}, l.signer)
	if err != nil {
		l.t.Fatal(err)
	}
	return msg
}

func (l *testLog) proof(from, to uint64) [][]byte {
	l.t.Helper()
	p, err := l.tree.ConsistencyProof(from, to)
	if err != nil {
		l.t.Fatal(err)
	}
	return p
}

// witnessKit is a witness for one test log with a state file that
// outlives witnesses: each witness() call is a restart.
type witnessKit struct {
	t      testing.TB
	log    *testLog
	cosig  *signing.CosignatureSigner
	cosigV note.Verifier // transparency-dev/formats' cosignature/v1 verifier
	path   string
}

// newWitnessKit makes a kit for l cosigning with key (a software Ed25519
// key stopped at cosigTime if nil).
func newWitnessKit(t testing.TB, l *testLog, key crypto.Signer) *witnessKit {
	t.Helper()
	now := time.Now
	if key == nil {
		_, key, _ = ed25519.GenerateKey(rand.Reader)
		now = func() time.Time { return cosigTime }
	}
	cs, err := signing.NewCosignatureV1Signer(witnessName, key, now)
	if err != nil {
		t.Fatal(err)
	}
	v, err := tnote.NewVerifierForCosignatureV1(cs.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	return &witnessKit{t: t, log: l, cosig: cs, cosigV: v, path: filepath.Join(t.TempDir(), "witness.json")}
}

// witness loads the state file into a new Witness.
func (k *witnessKit) witness() *signing.Witness {
	k.t.Helper()
	st, err := signing.NewFileWitnessState(k.path)
	if err != nil {
		k.t.Fatal(err)
	}
	return &signing.Witness{Signer: k.cosig, Logs: map[string]note.Verifier{testOrigin: k.log.vkey}, State: st}
}

// wantSize checks the state file records size for the test log.
func (k *witnessKit) wantSize(size uint64) {
	k.t.Helper()
	got, root, ok, err := k.witness().State.Get(context.Background(), testOrigin)
	if err != nil || !ok || got != size || !bytes.Equal(root, k.log.tree.HashAt(size)) {
		k.t.Fatalf("recorded (%d, %x, %v, %v), want size %d", got, root, ok, err, size)
	}
}

// checkCosigned checks that sigs holds exactly one signature line per
// verifier in vs, in order, and that checkpoint plus sigs verifies under
// the log's key and every one of vs.
func checkCosigned(t testing.TB, checkpoint, sigs []byte, logV note.Verifier, vs ...note.Verifier) {
	t.Helper()
	lines := strings.SplitAfter(string(sigs), "\n")
	if lines[len(lines)-1] != "" || len(lines)-1 != len(vs) {
		t.Fatalf("signatures %q: want %d lines each ending in a newline", sigs, len(vs))
	}
	for i, v := range vs {
		if !strings.HasPrefix(lines[i], "— "+v.Name()+" ") {
			t.Fatalf("signature line %d = %q, want one by %s", i, lines[i], v.Name())
		}
	}
	msg := append(bytes.Clone(checkpoint), sigs...)
	if err := signing.Verify(msg, append([]note.Verifier{logV}, vs...)...); err != nil {
		t.Fatalf("cosigned checkpoint does not verify: %v\n%s", err, msg)
	}
}

// cosigTimestamp returns the timestamp of the cosignature/v1 line by v.
func cosigTimestamp(t testing.TB, checkpoint, sigs []byte, v note.Verifier) time.Time {
	t.Helper()
	n, err := note.Open(append(bytes.Clone(checkpoint), sigs...), note.VerifierList(v))
	if err != nil {
		t.Fatal(err)
	}
	ts, err := tnote.CoSigV1Timestamp(n.Sigs[0])
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// serveAudit serves svc on a unix socket and returns a client and a stop
// function (also run at cleanup).
func serveAudit(t testing.TB, svc *server.WitnessService) (hsmdv1.AuditClient, func()) {
	t.Helper()
	g := grpc.NewServer()
	svc.Register(g)
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "audit.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(l)
	conn, err := grpc.NewClient("unix://"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			conn.Close()
			g.Stop()
		}
	}
	t.Cleanup(stop)
	return hsmdv1.NewAuditClient(conn), stop
}

func newAudit(t testing.TB, k *witnessKit, cfg server.WitnessConfig) (hsmdv1.AuditClient, func()) {
	t.Helper()
	svc, err := server.NewWitnessService(k.witness(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return serveAudit(t, svc)
}

func signCP(c hsmdv1.AuditClient, old uint64, proof [][]byte, cp []byte) ([]byte, error) {
	resp, err := c.SignCheckpoint(context.Background(), &hsmdv1.SignCheckpointRequest{OldSize: old, ConsistencyProof: proof, Checkpoint: cp})
	return resp.GetSignatures(), err
}

// wantStatus checks err's code and returns its ErrorInfo, if any.
func wantStatus(t testing.TB, err error, code codes.Code) *errdetails.ErrorInfo {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != code {
		t.Fatalf("err = %v, want code %v", err, code)
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info
		}
	}
	return nil
}

// wantSizeConflict checks err is ABORTED with a SIZE_CONFLICT at size.
func wantSizeConflict(t testing.TB, err error, size uint64) {
	t.Helper()
	info := wantStatus(t, err, codes.Aborted)
	if info.GetReason() != server.ReasonSizeConflict || info.GetDomain() != server.ErrorDomain ||
		info.GetMetadata()[server.MetadataSize] != fmt.Sprint(size) {
		t.Fatalf("ErrorInfo = %v, want %s size %d", info, server.ReasonSizeConflict, size)
	}
}

func wantBadProof(t testing.TB, err error) {
	t.Helper()
	if info := wantStatus(t, err, codes.FailedPrecondition); info.GetReason() != server.ReasonBadProof {
		t.Fatalf("ErrorInfo = %v, want %s", info, server.ReasonBadProof)
	}
}

func TestAuditGrowingLog(t *testing.T) {
	l := newTestLog(t, "a", 20)
	k := newWitnessKit(t, l, nil)
	c, _ := newAudit(t, k, server.WitnessConfig{})
	for _, step := range []struct{ old, size uint64 }{{0, 0}, {0, 5}, {5, 12}, {12, 12}, {12, 20}} {
		cp := l.checkpoint(step.size)
		var proof [][]byte
		if step.old > 0 {
			proof = l.proof(step.old, step.size)
		}
		sigs, err := signCP(c, step.old, proof, cp)
		if err != nil {
			t.Fatalf("%d -> %d: %v", step.old, step.size, err)
		}
		checkCosigned(t, cp, sigs, l.vkey, k.cosigV)
		if ts := cosigTimestamp(t, cp, sigs, k.cosigV); !ts.Equal(cosigTime) {
			t.Fatalf("cosignature timestamp %v, want %v", ts, cosigTime)
		}
		k.wantSize(step.size)
	}
}

func TestAuditRefusals(t *testing.T) {
	l := newTestLog(t, "a", 12)
	k := newWitnessKit(t, l, nil)
	c, _ := newAudit(t, k, server.WitnessConfig{})
	if _, err := signCP(c, 0, nil, l.checkpoint(5)); err != nil {
		t.Fatal(err)
	}

	t.Run("SizeConflict", func(t *testing.T) {
		_, err := signCP(c, 0, nil, l.checkpoint(12))
		wantSizeConflict(t, err, 5)
		_, err = signCP(c, 7, l.proof(7, 12), l.checkpoint(12))
		wantSizeConflict(t, err, 5)
	})
	t.Run("BadProof", func(t *testing.T) {
		p := l.proof(5, 12)
		p[0] = bytes.Clone(p[0])
		p[0][0] ^= 1
		_, err := signCP(c, 5, p, l.checkpoint(12))
		wantBadProof(t, err)
		_, err = signCP(c, 5, nil, l.checkpoint(12))
		wantBadProof(t, err)
	})
	t.Run("ForkAtSameSize", func(t *testing.T) {
		fork := newTestLog(t, "b", 5)
		fork.signer, fork.vkey = l.signer, l.vkey // the log's own key signs a fork
		_, err := signCP(c, 5, nil, fork.checkpoint(5))
		wantBadProof(t, err)
	})
	t.Run("UnknownOrigin", func(t *testing.T) {
		other := newTestLog(t, "a", 5)
		cp := bytes.Replace(other.checkpoint(5), []byte(testOrigin), []byte("example.com/other"), 1)
		_, err := signCP(c, 5, nil, cp)
		wantStatus(t, err, codes.NotFound)
	})
	t.Run("BadLogSignature", func(t *testing.T) {
		impostor := newTestLog(t, "a", 12) // another key under the log's name
		_, err := signCP(c, 5, nil, impostor.checkpoint(5))
		wantStatus(t, err, codes.PermissionDenied)
		cp := l.checkpoint(5)
		i := bytes.Index(cp, []byte("\n\n"))
		cp[i-1] ^= 1 // the last base64 character of the root hash
		_, err = signCP(c, 5, nil, cp)
		wantStatus(t, err, codes.PermissionDenied)
	})
	t.Run("Malformed", func(t *testing.T) {
		for name, req := range map[string]*hsmdv1.SignCheckpointRequest{
			"empty":      {OldSize: 5},
			"not a note": {OldSize: 5, Checkpoint: []byte(testOrigin + "\n5\n")},
			"too big":    {OldSize: 5, Checkpoint: append([]byte(testOrigin+"\n"), make([]byte, signing.MaxCheckpointSize)...)},
			"short hash": {OldSize: 5, ConsistencyProof: [][]byte{make([]byte, 31)}, Checkpoint: l.checkpoint(12)},
			"long proof": {OldSize: 5, ConsistencyProof: make([][]byte, signing.MaxProofHashes+1), Checkpoint: l.checkpoint(12)},
			"rollback":   {OldSize: 5, Checkpoint: l.checkpoint(3)},
			"long hash":  {OldSize: 5, ConsistencyProof: [][]byte{make([]byte, 33)}, Checkpoint: l.checkpoint(12)},
		} {
			_, err := c.SignCheckpoint(context.Background(), req)
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("%s: err = %v, want InvalidArgument", name, err)
			}
		}
	})
	// No refusal moved the witness.
	k.wantSize(5)
	sigs, err := signCP(c, 5, l.proof(5, 12), l.checkpoint(12))
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, l.checkpoint(12), sigs, l.vkey, k.cosigV)

	t.Run("Rollback", func(t *testing.T) {
		_, err := signCP(c, 12, nil, l.checkpoint(5))
		wantStatus(t, err, codes.InvalidArgument)
		_, err = signCP(c, 5, nil, l.checkpoint(5))
		wantSizeConflict(t, err, 12)
		k.wantSize(12)
	})
}

func TestAuditStateSurvivesRestart(t *testing.T) {
	l := newTestLog(t, "a", 20)
	k := newWitnessKit(t, l, nil)
	c, stop := newAudit(t, k, server.WitnessConfig{})
	if _, err := signCP(c, 0, nil, l.checkpoint(12)); err != nil {
		t.Fatal(err)
	}
	stop()

	c, _ = newAudit(t, k, server.WitnessConfig{}) // new state, service and server
	_, err := signCP(c, 0, nil, l.checkpoint(20))
	wantSizeConflict(t, err, 12)
	fork := newTestLog(t, "b", 12)
	fork.signer, fork.vkey = l.signer, l.vkey
	_, err = signCP(c, 12, nil, fork.checkpoint(12))
	wantBadProof(t, err)
	cp := l.checkpoint(20)
	sigs, err := signCP(c, 12, l.proof(12, 20), cp)
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, cp, sigs, l.vkey, k.cosigV)
	k.wantSize(20)
}

// openHSM opens a fresh SoftHSM token with hsmd's keys and checks at
// cleanup that no PKCS#11 session is left open.
func openHSM(t testing.TB) *hsm.HSM {
	t.Helper()
	ctx := context.Background()
	tok := softhsm.NewTestToken(t)
	h, err := hsm.Open(ctx, hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PINFile: tok.PINFile, CallTimeout: 2 * time.Second})
	if err != nil {
		t.Fatalf("hsm.Open: %v", err)
	}
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("closing the HSM: %v", err)
		}
		if n := h.OpenSessions(); n != 0 {
			t.Errorf("%d PKCS#11 sessions left open after Close", n)
		}
	})
	if err := h.InitKeys(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.LoadKeys(ctx); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestAuditHSM cosigns with the SoftHSM Ed25519 key and adds the HSM ECDSA
// P-256 signature and an ML-DSA-44 cosignature, each checked by an
// independent verifier.
func TestAuditHSM(t *testing.T) {
	ctx := context.Background()
	h := openHSM(t)
	edS, err := h.Signer(ctx, hsm.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	ecS, err := h.Signer(ctx, hsm.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := signing.NewNoteSigner(witnessName, ecS)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := signing.GenerateMLDSA(nil)
	if err != nil {
		t.Fatal(err)
	}
	ml, err := signing.NewMLDSASigner(witnessName, priv)
	clear(priv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ml.Destroy)
	ecV, err := tnote.NewECDSAVerifier(ec.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	mlV, err := tnote.NewVerifierForCosignatureV1(ml.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}

	l := newTestLog(t, "a", 30)
	k := newWitnessKit(t, l, edS)
	c, _ := newAudit(t, k, server.WitnessConfig{ECDSA: ec, MLDSA: ml})
	before := time.Now().Add(-time.Second)

	cp := l.checkpoint(10)
	sigs, err := signCP(c, 0, nil, cp)
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, cp, sigs, l.vkey, k.cosigV)
	if ts := cosigTimestamp(t, cp, sigs, k.cosigV); ts.Before(before) || ts.After(time.Now()) {
		t.Fatalf("cosignature timestamp %v is not now", ts)
	}

	for _, tc := range []struct {
		name      string
		ecdsa, pq bool
		old, size uint64
		verifiers []note.Verifier
	}{
		{"ECDSA", true, false, 10, 20, []note.Verifier{k.cosigV, ecV}},
		{"ECDSAAndMLDSA", true, true, 20, 30, []note.Verifier{k.cosigV, ecV, mlV}},
		{"MLDSA", false, true, 30, 30, []note.Verifier{k.cosigV, mlV}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := l.checkpoint(tc.size)
			var proof [][]byte
			if tc.old != tc.size {
				proof = l.proof(tc.old, tc.size)
			}
			resp, err := c.SignCheckpoint(ctx, &hsmdv1.SignCheckpointRequest{
				OldSize: tc.old, ConsistencyProof: proof, Checkpoint: cp, HsmEcdsa: tc.ecdsa, Mldsa: tc.pq})
			if err != nil {
				t.Fatal(err)
			}
			checkCosigned(t, cp, resp.GetSignatures(), l.vkey, tc.verifiers...)
		})
	}
	k.wantSize(30)
}

func TestAuditExtraSigners(t *testing.T) {
	l := newTestLog(t, "a", 12)
	k := newWitnessKit(t, l, nil)
	priv, err := signing.GenerateMLDSA(nil)
	if err != nil {
		t.Fatal(err)
	}
	ml, err := signing.NewMLDSASigner(witnessName, priv)
	if err != nil {
		t.Fatal(err)
	}
	mlV, err := tnote.NewMLDSAVerifier(ml.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	c, _ := newAudit(t, k, server.WitnessConfig{MLDSA: ml})
	ctx := context.Background()

	// An extra signer not configured: refused before anything is recorded.
	_, err = c.SignCheckpoint(ctx, &hsmdv1.SignCheckpointRequest{Checkpoint: l.checkpoint(5), HsmEcdsa: true})
	if info := wantStatus(t, err, codes.FailedPrecondition); info != nil || !strings.Contains(err.Error(), "hsm_ecdsa") {
		t.Fatalf("err = %v (ErrorInfo %v), want one naming hsm_ecdsa", err, info)
	}
	// ML-DSA cannot cover extension lines: refused before recording.
	_, err = c.SignCheckpoint(ctx, &hsmdv1.SignCheckpointRequest{Checkpoint: l.checkpoint(5, "ext"), Mldsa: true})
	wantStatus(t, err, codes.InvalidArgument)
	if _, _, ok, _ := k.witness().State.Get(ctx, testOrigin); ok {
		t.Fatal("a refused request was recorded")
	}

	// Without mldsa, extension lines are cosigned (cosignature/v1 covers them).
	cp := l.checkpoint(5, "ext")
	sigs, err := signCP(c, 0, nil, cp)
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, cp, sigs, l.vkey, k.cosigV)

	cp = l.checkpoint(12)
	resp, err := c.SignCheckpoint(ctx, &hsmdv1.SignCheckpointRequest{OldSize: 5, ConsistencyProof: l.proof(5, 12), Checkpoint: cp, Mldsa: true})
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, cp, resp.GetSignatures(), l.vkey, k.cosigV, mlV)

	// A destroyed ML-DSA key fails after recording: UNAVAILABLE, and a
	// retry at the new size cosigns again.
	ml.Destroy()
	_, err = c.SignCheckpoint(ctx, &hsmdv1.SignCheckpointRequest{OldSize: 12, Checkpoint: cp, Mldsa: true})
	wantStatus(t, err, codes.Unavailable)
	sigs, err = signCP(c, 12, nil, cp)
	if err != nil {
		t.Fatal(err)
	}
	checkCosigned(t, cp, sigs, l.vkey, k.cosigV)
}

// failingSigner is an Ed25519 crypto.Signer whose device has gone away.
type failingSigner struct{ pub ed25519.PublicKey }

var errDeviceGone = errors.New("hsm: token removed")

func (f failingSigner) Public() crypto.PublicKey { return f.pub }
func (f failingSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errDeviceGone
}

func TestAuditSignerUnavailable(t *testing.T) {
	l := newTestLog(t, "a", 5)
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	k := newWitnessKit(t, l, failingSigner{pub})
	c, _ := newAudit(t, k, server.WitnessConfig{})
	_, err := signCP(c, 0, nil, l.checkpoint(5))
	wantStatus(t, err, codes.Unavailable)
	if strings.Contains(err.Error(), errDeviceGone.Error()) {
		t.Fatalf("the status leaks the internal cause: %v", err)
	}
	if !strings.Contains(err.Error(), "request id ") {
		t.Fatalf("the status names no request id: %v", err)
	}
}

func TestNewWitnessServiceChecks(t *testing.T) {
	l := newTestLog(t, "a", 1)
	k := newWitnessKit(t, l, nil)
	for name, w := range map[string]*signing.Witness{
		"nil":       nil,
		"no signer": {Logs: k.witness().Logs, State: k.witness().State},
		"no state":  {Signer: k.cosig, Logs: k.witness().Logs},
		"no logs":   {Signer: k.cosig, State: k.witness().State},
	} {
		if _, err := server.NewWitnessService(w, server.WitnessConfig{}); err == nil {
			t.Errorf("%s: NewWitnessService accepted it", name)
		}
		if _, err := server.NewWitnessHandler(w, nil); err == nil {
			t.Errorf("%s: NewWitnessHandler accepted it", name)
		}
	}
}
