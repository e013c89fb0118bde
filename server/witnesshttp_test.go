package server_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	tnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/tessera"
	"github.com/transparency-dev/tessera/storage/posix"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/server"
	"github.com/hsmd/hsmd/signing"
)

// tesseraWitness is the witness client of github.com/transparency-dev/tessera
// v1.0.4 (internal/witness/witness.go: the witness type and its update
// method; the URL from tessera.NewWitness in witness.go). Tessera is not a
// dependency of this module and that package is internal, so its request
// format and response handling are copied here statement for statement,
// without its metrics and logging.
type tesseraWitness struct {
	client   *http.Client
	url      string
	verifier note.Verifier
	size     uint64
}

type tesseraCtxKey int

const (
	antiRecursionCtxKey tesseraCtxKey = iota
	maxUpdateRecursion                = 10
)

// newTesseraWitness is tessera.NewWitness(vkey, root) plus the gateway's
// initial witness state (size 0).
func newTesseraWitness(t testing.TB, client *http.Client, vkey, root string) *tesseraWitness {
	t.Helper()
	v, err := tnote.NewVerifierForCosignatureV1(vkey)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(root)
	if err != nil {
		t.Fatal(err)
	}
	return &tesseraWitness{client: client, url: u.JoinPath("/add-checkpoint").String(), verifier: v}
}

func (w *tesseraWitness) update(ctx context.Context, cp []byte, size uint64, fetchProof func(ctx context.Context, from, to uint64) ([][]byte, error)) ([]byte, error) {
	var recursed uint
	if v := ctx.Value(antiRecursionCtxKey); v != nil {
		recursed = v.(uint)
	}
	if recursed >= maxUpdateRecursion {
		return nil, fmt.Errorf("too many consecutive requests to witness %s", w.verifier.Name())
	}
	var proof [][]byte
	if w.size > 0 {
		var err error
		proof, err = fetchProof(ctx, w.size, size)
		if err != nil {
			return nil, fmt.Errorf("fetchProof: %v", err)
		}
	}
	body := fmt.Sprintf("old %d\n", w.size)
	for _, p := range proof {
		body += base64.StdEncoding.EncodeToString(p) + "\n"
	}
	body += "\n"
	body += string(cp)

	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url, strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("failed to construct request to %q: %v", w.url, err)
	}
	httpResp, err := w.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("failed to post to witness at %q: %v", w.url, err)
	}
	defer func() { _ = httpResp.Body.Close() }()
	rb, err := io.ReadAll(httpResp.Body)
	if err != nil {
		return nil, fmt.Errorf("failed to read body from witness at %q: %v", w.url, err)
	}
	switch httpResp.StatusCode {
	case http.StatusOK:
		signed := make([]byte, len(cp)+len(rb))
		copy(signed, cp)
		copy(signed[len(cp):], rb)
		n, err := note.Open(signed, note.VerifierList(w.verifier))
		if err != nil {
			return nil, fmt.Errorf("witness %q at %q replied with invalid signature: %q\nconstructed note: %q\nerror: %v", w.verifier.Name(), w.url, rb, string(signed), err)
		}
		w.size = uint64(size)
		return fmt.Appendf(nil, "— %s %s\n", n.Sigs[0].Name, n.Sigs[0].Base64), nil
	case http.StatusConflict:
		ct := httpResp.Header["Content-Type"]
		if len(ct) == 1 && ct[0] == "text/x.tlog.size" {
			bodyStr := strings.TrimSpace(string(rb))
			newWitSize, err := strconv.ParseUint(bodyStr, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("witness at %q replied with x.tlog.size but body %q could not be parsed as decimal", w.url, bodyStr)
			}
			if newWitSize > size {
				return nil, fmt.Errorf("witness at %q replied with x.tlog.size %d, larger than log size %d", w.url, newWitSize, size)
			}
			w.size = newWitSize
			return w.update(context.WithValue(ctx, antiRecursionCtxKey, recursed+1), cp, size, fetchProof)
		}
		return nil, fmt.Errorf("witness at %q says old root hash did not match previous for size %d: %d", w.url, w.size, httpResp.StatusCode)
	case http.StatusNotFound:
		return nil, fmt.Errorf("witness at %q says checkpoint origin is unknown: %d", w.url, httpResp.StatusCode)
	case http.StatusForbidden:
		return nil, fmt.Errorf("witness at %q says no signatures verify against trusted public key: %d", w.url, httpResp.StatusCode)
	case http.StatusBadRequest:
		return nil, fmt.Errorf("witness at %q says old checkpoint size of %d is too large: %d", w.url, w.size, httpResp.StatusCode)
	case http.StatusUnprocessableEntity:
		return nil, fmt.Errorf("witness at %q says that the consistency proof is bad: %d", w.url, httpResp.StatusCode)
	default:
		return nil, fmt.Errorf("got bad status code: %v", httpResp.StatusCode)
	}
}

// serveWitnessHTTP serves k's witness under the submission prefix
// /witness and returns the server.
func serveWitnessHTTP(t testing.TB, k *witnessKit) *httptest.Server {
	t.Helper()
	h, err := server.NewWitnessHandler(k.witness(), nil)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/witness/", http.StripPrefix("/witness", h))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// addCheckpointBody is a tlog-witness add-checkpoint request body.
func addCheckpointBody(old uint64, proof [][]byte, cp []byte) []byte {
	b := fmt.Appendf(nil, "old %d\n", old)
	for _, p := range proof {
		b = append(b, base64.StdEncoding.EncodeToString(p)+"\n"...)
	}
	return append(append(b, '\n'), cp...)
}

type httpAnswer struct {
	code int
	ct   string
	body string
}

func post(t testing.TB, srv *httptest.Server, body []byte) httpAnswer {
	t.Helper()
	a, err := tryPost(srv, body)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// tryPost is post for goroutines other than the test's.
func tryPost(srv *httptest.Server, body []byte) (httpAnswer, error) {
	resp, err := srv.Client().Post(srv.URL+"/witness/add-checkpoint", "text/plain", bytes.NewReader(body))
	if err != nil {
		return httpAnswer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return httpAnswer{resp.StatusCode, resp.Header.Get("Content-Type"), string(b)}, err
}

// wantHTTPConflict checks a is the 409 naming the witness's size.
func wantHTTPConflict(t testing.TB, a httpAnswer, size uint64) {
	t.Helper()
	if a.code != http.StatusConflict || a.ct != server.SizeContentType || a.body != fmt.Sprintf("%d\n", size) {
		t.Fatalf("answer %d %q %q, want 409 %s %q", a.code, a.ct, a.body, server.SizeContentType, fmt.Sprintf("%d\n", size))
	}
}

func wantCode(t testing.TB, a httpAnswer, code int) {
	t.Helper()
	if a.code != code {
		t.Fatalf("answer %d %q %q, want %d", a.code, a.ct, a.body, code)
	}
}

// TestWitnessHTTPTesseraClient drives the handler with tessera's witness
// client: a growing log, a client that learns the witness's size from a
// 409, and a witness restarted on its state file.
func TestWitnessHTTPTesseraClient(t *testing.T) {
	ctx := context.Background()
	l := newTestLog(t, "a", 30)
	k := newWitnessKit(t, l, nil)
	srv := serveWitnessHTTP(t, k)
	var fetched []string
	fetchProof := func(_ context.Context, from, to uint64) ([][]byte, error) {
		fetched = append(fetched, fmt.Sprintf("%d-%d", from, to))
		return l.tree.ConsistencyProof(from, to)
	}
	// witnessCP is what tessera's gateway does with one witness's answer.
	witnessCP := func(tw *tesseraWitness, size uint64) {
		t.Helper()
		cp := l.checkpoint(size)
		sig, err := tw.update(ctx, cp, size, fetchProof)
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if !bytes.HasSuffix(sig, []byte("\n")) || tw.size != size {
			t.Fatalf("size %d: signature %q, client at size %d", size, sig, tw.size)
		}
		checkCosigned(t, cp, sig, l.vkey, k.cosigV)
	}

	tw := newTesseraWitness(t, srv.Client(), k.cosig.VerifierKey(), srv.URL+"/witness")
	witnessCP(tw, 5)
	witnessCP(tw, 12)
	if want := []string{"5-12"}; fmt.Sprint(fetched) != fmt.Sprint(want) {
		t.Fatalf("proofs fetched %v, want %v", fetched, want)
	}

	// A log restarted without its witness state sends old 0, gets a 409
	// with size 12, and retries with a proof from 12.
	fetched = nil
	witnessCP(newTesseraWitness(t, srv.Client(), k.cosig.VerifierKey(), srv.URL+"/witness"), 20)
	if want := []string{"12-20"}; fmt.Sprint(fetched) != fmt.Sprint(want) {
		t.Fatalf("proofs fetched %v, want %v", fetched, want)
	}

	// A fork at the witness's size: tessera reads the plain 409 as a root
	// hash mismatch, not as a size to retry with.
	fork := newTestLog(t, "b", 20)
	fork.signer, fork.vkey = l.signer, l.vkey
	tw.size = 20
	if _, err := tw.update(ctx, fork.checkpoint(20), 20, fetchProof); err == nil || !strings.Contains(err.Error(), "old root hash did not match") {
		t.Fatalf("fork: err = %v, want tessera's root hash mismatch", err)
	}

	// A restarted witness continues from its state file.
	srv2 := serveWitnessHTTP(t, k)
	fetched = nil
	witnessCP(newTesseraWitness(t, srv2.Client(), k.cosig.VerifierKey(), srv2.URL+"/witness"), 30)
	if want := []string{"20-30"}; fmt.Sprint(fetched) != fmt.Sprint(want) {
		t.Fatalf("proofs fetched %v, want %v", fetched, want)
	}
	k.wantSize(30)
}

// TestWitnessHTTPTesseraLog runs a real tessera POSIX log that must get
// hsmd's cosignature before it publishes a checkpoint
// (AppendOptions.WithWitnesses): tessera's own witness client, reached
// through its public API, drives the handler, first at size 0, then with
// consistency proofs as the log grows.
func TestWitnessHTTPTesseraLog(t *testing.T) {
	// A refusal would stall publication: bound the wait.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := newTestLog(t, "unused", 0) // its key signs tessera's checkpoints
	k := newWitnessKit(t, l, nil)
	srv := serveWitnessHTTP(t, k)
	group, err := tessera.NewWitnessGroupFromPolicy(fmt.Appendf(nil, "witness hsmd %s %s/witness\nquorum hsmd\n", k.cosig.VerifierKey(), srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	drv, err := posix.New(ctx, posix.Config{Path: t.TempDir(), HTTPClient: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	opts := tessera.NewAppendOptions().
		WithCheckpointSigner(l.signer).
		WithCheckpointInterval(100*time.Millisecond).
		WithBatching(8, 10*time.Millisecond).
		WithWitnesses(group, &tessera.WitnessOptions{Timeout: 10 * time.Second})
	app, shutdown, reader, err := tessera.NewAppender(ctx, drv, opts)
	if err != nil {
		t.Fatal(err)
	}
	awaiter := tessera.NewPublicationAwaiter(ctx, reader.ReadCheckpoint, 20*time.Millisecond)
	// witnessSize reads the witness's state file afresh.
	witnessSize := func() (uint64, bool, error) {
		size, _, ok, err := k.witness().State.Get(ctx, testOrigin)
		return size, ok, err
	}
	for round := range 3 {
		var futures []tessera.IndexFuture
		for i := range 5 {
			futures = append(futures, app.Add(ctx, tessera.NewEntry(fmt.Appendf(nil, "round %d entry %d", round, i))))
		}
		for _, f := range futures {
			idx, cp, err := awaiter.Await(ctx, f)
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			// Published checkpoints carry the log's signature and hsmd's
			// cosignature, and hsmd recorded at least that size.
			if err := signing.Verify(cp, l.vkey, k.cosigV); err != nil {
				t.Fatalf("round %d: published checkpoint: %v\n%s", round, err, cp)
			}
			size, ok, err := witnessSize()
			if err != nil || !ok || size <= idx.Index {
				t.Fatalf("round %d: witness at (%d, %v, %v), entry %d published", round, size, ok, err, idx.Index)
			}
		}
	}
	if err := shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if size, ok, err := witnessSize(); size != 15 || !ok || err != nil {
		t.Fatalf("witness at (%d, %v, %v), want size 15", size, ok, err)
	}
}

func TestWitnessHTTPGrowingLog(t *testing.T) {
	l := newTestLog(t, "a", 20)
	k := newWitnessKit(t, l, nil)
	srv := serveWitnessHTTP(t, k)
	for _, step := range []struct{ old, size uint64 }{{0, 5}, {5, 12}, {12, 12}, {12, 20}} {
		cp := l.checkpoint(step.size)
		var proof [][]byte
		if step.old > 0 {
			proof = l.proof(step.old, step.size)
		}
		a := post(t, srv, addCheckpointBody(step.old, proof, cp))
		wantCode(t, a, http.StatusOK)
		checkCosigned(t, cp, []byte(a.body), l.vkey, k.cosigV)
		if ts := cosigTimestamp(t, cp, []byte(a.body), k.cosigV); !ts.Equal(cosigTime) {
			t.Fatalf("cosignature timestamp %v, want %v", ts, cosigTime)
		}
		k.wantSize(step.size)
	}
}

func TestWitnessHTTPRefusals(t *testing.T) {
	l := newTestLog(t, "a", 12)
	k := newWitnessKit(t, l, nil)
	srv := serveWitnessHTTP(t, k)
	wantCode(t, post(t, srv, addCheckpointBody(0, nil, l.checkpoint(5))), http.StatusOK)

	badProof := l.proof(5, 12)
	badProof[0] = bytes.Clone(badProof[0])
	badProof[0][0] ^= 1
	fork := newTestLog(t, "b", 5)
	fork.signer, fork.vkey = l.signer, l.vkey
	other := bytes.Replace(newTestLog(t, "a", 5).checkpoint(5), []byte(testOrigin), []byte("example.com/other"), 1)
	tampered := l.checkpoint(5)
	tampered[bytes.Index(tampered, []byte("\n\n"))-1] ^= 1
	cp5, cp12 := string(l.checkpoint(5)), string(l.checkpoint(12))
	hash := base64.StdEncoding.EncodeToString(l.proof(5, 12)[0])

	for _, tc := range []struct {
		name string
		body []byte
		code int
	}{
		{"BadProof", addCheckpointBody(5, badProof, l.checkpoint(12)), http.StatusUnprocessableEntity},
		{"EmptyProof", addCheckpointBody(5, nil, l.checkpoint(12)), http.StatusUnprocessableEntity},
		{"ProofAtSameSize", addCheckpointBody(5, l.proof(5, 12)[:1], l.checkpoint(5)), http.StatusUnprocessableEntity},
		{"ForkAtSameSize", addCheckpointBody(5, nil, fork.checkpoint(5)), http.StatusConflict},
		{"UnknownOrigin", addCheckpointBody(5, nil, other), http.StatusNotFound},
		{"OtherLogKey", addCheckpointBody(5, nil, newTestLog(t, "a", 5).checkpoint(5)), http.StatusForbidden},
		{"TamperedCheckpoint", addCheckpointBody(5, nil, tampered), http.StatusForbidden},
		{"Empty", nil, http.StatusBadRequest},
		{"NoNewline", []byte("old 5"), http.StatusBadRequest},
		{"NotOld", []byte("new 5\n\n" + cp5), http.StatusBadRequest},
		{"LeadingZero", []byte("old 05\n\n" + cp5), http.StatusBadRequest},
		{"Signed", []byte("old +5\n\n" + cp5), http.StatusBadRequest},
		{"Overflow", []byte("old 18446744073709551616\n\n" + cp5), http.StatusBadRequest},
		{"NoEmptyLine", []byte("old 5\n" + hash + "\n"), http.StatusBadRequest},
		{"NotBase64", []byte("old 5\n" + hash[:43] + "!\n\n" + cp12), http.StatusBadRequest},
		{"ShortHash", []byte("old 5\n" + base64.StdEncoding.EncodeToString(make([]byte, 31)) + "\n\n" + cp12), http.StatusBadRequest},
		{"CRLF", []byte("old 5\n" + hash + "\r\n\n" + cp12), http.StatusBadRequest},
		{"TooManyLines", []byte("old 5\n" + strings.Repeat(hash+"\n", signing.MaxProofHashes+1) + "\n" + cp12), http.StatusBadRequest},
		{"NotANote", []byte("old 5\n\n" + testOrigin + "\n5\n"), http.StatusBadRequest},
		{"TooBig", append([]byte("old 5\n\n"), make([]byte, server.MaxAddCheckpointBody)...), http.StatusRequestEntityTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := post(t, srv, tc.body)
			wantCode(t, a, tc.code)
			if a.ct == server.SizeContentType {
				t.Fatalf("refusal %d has Content-Type %s", a.code, a.ct)
			}
		})
	}

	t.Run("SizeConflict", func(t *testing.T) {
		wantHTTPConflict(t, post(t, srv, addCheckpointBody(0, nil, l.checkpoint(12))), 5)
		wantHTTPConflict(t, post(t, srv, addCheckpointBody(7, l.proof(7, 12), l.checkpoint(12))), 5)
	})
	t.Run("Method", func(t *testing.T) {
		resp, err := srv.Client().Get(srv.URL + "/witness/add-checkpoint")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != http.MethodPost {
			t.Fatalf("GET: %d, Allow %q; want 405, POST", resp.StatusCode, resp.Header.Get("Allow"))
		}
	})
	t.Run("OtherPath", func(t *testing.T) {
		resp, err := srv.Client().Post(srv.URL+"/witness/sign-subtree", "text/plain", strings.NewReader(cp5))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Fatalf("POST sign-subtree: %d, want 404", resp.StatusCode)
		}
	})
	// No refusal moved the witness.
	k.wantSize(5)

	wantCode(t, post(t, srv, addCheckpointBody(5, l.proof(5, 12), l.checkpoint(12))), http.StatusOK)
	t.Run("Rollback", func(t *testing.T) {
		wantCode(t, post(t, srv, addCheckpointBody(12, nil, l.checkpoint(5))), http.StatusBadRequest)
		wantHTTPConflict(t, post(t, srv, addCheckpointBody(5, nil, l.checkpoint(5))), 12)
		k.wantSize(12)
	})
}

func TestWitnessHTTPStateSurvivesRestart(t *testing.T) {
	l := newTestLog(t, "a", 20)
	k := newWitnessKit(t, l, nil)
	srv := serveWitnessHTTP(t, k)
	wantCode(t, post(t, srv, addCheckpointBody(0, nil, l.checkpoint(12))), http.StatusOK)
	srv.Close()

	srv = serveWitnessHTTP(t, k) // new state, handler and server
	wantHTTPConflict(t, post(t, srv, addCheckpointBody(0, nil, l.checkpoint(20))), 12)
	fork := newTestLog(t, "b", 12)
	fork.signer, fork.vkey = l.signer, l.vkey
	wantCode(t, post(t, srv, addCheckpointBody(12, nil, fork.checkpoint(12))), http.StatusConflict)
	cp := l.checkpoint(20)
	a := post(t, srv, addCheckpointBody(12, l.proof(12, 20), cp))
	wantCode(t, a, http.StatusOK)
	checkCosigned(t, cp, []byte(a.body), l.vkey, k.cosigV)
	k.wantSize(20)
}

// TestWitnessHTTPConcurrent sends the same update at once: exactly one
// wins, the others learn its size.
func TestWitnessHTTPConcurrent(t *testing.T) {
	l := newTestLog(t, "a", 12)
	k := newWitnessKit(t, l, nil)
	srv := serveWitnessHTTP(t, k)
	wantCode(t, post(t, srv, addCheckpointBody(0, nil, l.checkpoint(5))), http.StatusOK)
	body := addCheckpointBody(5, l.proof(5, 12), l.checkpoint(12))
	const n = 8
	answers := make([]httpAnswer, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { answers[i], errs[i] = tryPost(srv, body) })
	}
	wg.Wait()
	wins := 0
	for i, a := range answers {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if a.code == http.StatusOK {
			wins++
			continue
		}
		wantHTTPConflict(t, a, 12)
	}
	if wins != 1 {
		t.Fatalf("%d requests won, want 1", wins)
	}
	k.wantSize(12)
}

func TestWitnessHTTPSignerUnavailable(t *testing.T) {
	l := newTestLog(t, "a", 5)
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	k := newWitnessKit(t, l, failingSigner{pub})
	a := post(t, serveWitnessHTTP(t, k), addCheckpointBody(0, nil, l.checkpoint(5)))
	wantCode(t, a, http.StatusServiceUnavailable)
	if strings.Contains(a.body, errDeviceGone.Error()) || !strings.Contains(a.body, "request id ") {
		t.Fatalf("503 body %q leaks the cause or names no request id", a.body)
	}
}
