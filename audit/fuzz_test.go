package audit

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/transparency-dev/formats/log"
	"golang.org/x/mod/sumdb/note"

	"github.com/hsmd/hsmd/signing"
)

// fuzzEntries are realistic stored entries and broken ones.
func fuzzEntries(f *testing.F) [][]byte {
	f.Helper()
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	var out [][]byte
	for _, e := range []Entry{
		{Seq: 0, Time: t0, Kind: KindSystem, Op: "start", Detail: "rollback counter 7"},
		{Seq: 1, Time: t0, Kind: KindRPC, RequestID: "0123456789abcdef", Caller: "unix:uid=0", Method: "Encrypt", Tenant: "billing",
			KeyVersions: []uint32{1, 2}, Items: 100, FailedItems: 1, Code: "OK", Contexts: []string{"hmac-sha256:AAAA"}, ContextsTruncated: true},
		{Seq: 2, Time: t0, Kind: KindRequest, Caller: "tcp:127.0.0.1:4000", Method: "RotateKey", Tenant: "billing"},
		{Seq: 3, Time: t0, Kind: KindKeyEvent, Op: "rotate", Tenant: "billing", KeyVersions: []uint32{3}},
	} {
		b, err := e.marshal()
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, b)
	}
	return append(out,
		[]byte(`{"seq":1,"kind":"rpc","unknown":1}`), []byte(`{"seq":1}`), []byte(`{"kind":"rpc"} {}`),
		[]byte(`{"seq":-1,"kind":"rpc"}`), []byte(`{"time":"yesterday","kind":"rpc"}`), []byte(`null`), []byte(``),
		[]byte(`{"kind":"rpc","key_versions":[4294967296]}`), []byte(`{"kind":"r\u00e9sum\u00e9","detail":"<&>"}`),
	)
}

// FuzzParseEntry: ParseEntry never panics, refuses oversized input
// before decoding it, and what it accepts marshals to an entry that parses
// to the same thing (parse, marshal, parse, marshal is a fixed point).
func FuzzParseEntry(f *testing.F) {
	seeds := fuzzEntries(f)
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s)
	}
	if _, err := ParseEntry(append([]byte(`{"kind":"rpc","detail":"`), make([]byte, MaxEntrySize)...)); err == nil {
		f.Fatal("an entry over MaxEntrySize was accepted")
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := ParseEntry(b)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "audit: ") {
				t.Fatalf("unprefixed error %v", err)
			}
			return
		}
		if len(b) > MaxEntrySize || e.Kind == "" {
			t.Fatalf("accepted %d bytes with kind %q", len(b), e.Kind)
		}
		m1, err := e.marshal()
		if err != nil {
			return // JSON escaping can grow it past MaxEntrySize
		}
		e2, err := ParseEntry(m1)
		if err != nil {
			t.Fatalf("a marshalled entry does not parse: %v\n%s", err, m1)
		}
		m2, err := e2.marshal()
		if err != nil || !bytes.Equal(m1, m2) {
			t.Fatalf("marshal is not stable:\n%s\n%s (%v)", m1, m2, err)
		}
		// An empty list and none are the same entry (omitempty drops it).
		if !e.Time.Equal(e2.Time) || e.Seq != e2.Seq || !slices.Equal(e.KeyVersions, e2.KeyVersions) {
			t.Fatalf("round trip changed the entry: %+v -> %+v", e, e2)
		}
		var generic map[string]any
		if err := json.Unmarshal(m1, &generic); err != nil {
			t.Fatalf("marshalled entry is not JSON: %v", err)
		}
	})
}

// FuzzParseVerifiers: ParseVerifiers (one key a line, as ReadVerifiers
// gives them) never panics, errors are prefixed, and each accepted key
// gives a verifier named as the key and of the key's type.
func FuzzParseVerifiers(f *testing.F) {
	_, vkeys := softSigners(f)
	f.Add(strings.Join(vkeys, "\n"))
	for _, k := range vkeys {
		f.Add(k)
		f.Add(k[:len(k)-4])                             // truncated
		f.Add(strings.Replace(k, "+", "+0", 1))         // bad hash
		f.Add(strings.Replace(k, testOrigin, "x y", 1)) // bad name
	}
	f.Add("")
	f.Add("name+00000000+AQ==")
	f.Fuzz(func(t *testing.T, s string) {
		keys := strings.Split(s, "\n")
		vs, err := ParseVerifiers(keys)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "audit: verifier key ") {
				t.Fatalf("unprefixed error %v", err)
			}
			return
		}
		if len(vs) != len(keys) {
			t.Fatalf("%d verifiers for %d keys", len(vs), len(keys))
		}
		for i, v := range vs {
			name, _, _ := strings.Cut(keys[i], "+")
			if v.Name() != name {
				t.Fatalf("verifier named %q for key %q", v.Name(), keys[i])
			}
			if tv := v.(typedVerifier); tv.typ != keyType(keys[i]) {
				t.Fatalf("type %#x for key %q", tv.typ, keys[i])
			}
		}
	})
}

// fuzzCheckpoints returns checkpoints signed by signers, and broken ones.
func fuzzCheckpoints(f *testing.F, signers []note.Signer) [][]byte {
	f.Helper()
	var out [][]byte
	for _, size := range []uint64{0, 1, 1000} {
		root := bytes.Repeat([]byte{byte(size)}, 32)
		text := string(log.Checkpoint{Origin: testOrigin, Size: size, Hash: root}.Marshal())
		n, err := note.Sign(&note.Note{Text: text}, signers...)
		if err != nil {
			f.Fatal(err)
		}
		out = append(out, n)
	}
	n := out[1]
	return append(out,
		bytes.Replace(n, []byte("\n1\n"), []byte("\n01\n"), 1),
		bytes.Replace(n, []byte("\n1\n"), []byte("\n-1\n"), 1),
		n[:len(n)/2], []byte(testOrigin+"\n1\n"), []byte("\n\n\n\n"),
	)
}

// FuzzVerifyNote: verifyNote (the check of every archived checkpoint)
// never panics; what it accepts is a canonical note signed by a key of
// each type; the checkpoint text it parses marshals back to the same
// checkpoint.
func FuzzVerifyNote(f *testing.F) {
	signers, vkeys := softSigners(f)
	vs, err := ParseVerifiers(vkeys)
	if err != nil {
		f.Fatal(err)
	}
	seeds := fuzzCheckpoints(f, signers)
	if len(seeds) == 0 {
		f.Fatal("empty seed corpus")
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, n []byte) {
		if cp, err := parseCheckpointText(n); err == nil {
			var again log.Checkpoint
			if _, err := again.Unmarshal(cp.Marshal()); err != nil || !reflect.DeepEqual(again, *cp) {
				t.Fatalf("checkpoint %+v marshals to one that parses as %+v (%v)", cp, again, err)
			}
		}
		if err := verifyNote(n, vs); err != nil {
			return
		}
		if err := signing.CheckCanonical(n); err != nil {
			t.Fatalf("accepted a non-canonical note: %v", err)
		}
		for _, v := range vs {
			if _, err := note.Open(n, note.VerifierList(v)); err != nil {
				t.Fatalf("accepted a note %s did not sign: %v", v.Name(), err)
			}
		}
	})
}

// archiveRecord is one record of the checkpoint archive.
func archiveRecord(n []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(n))), n...)
}

// FuzzReadArchive: reading an archive file never panics nor allocates
// more than MaxCheckpointSize per record; the records it yields are the
// file's bytes (re-encoding them gives the file's prefix); openArchive
// either refuses the file or cuts it to its whole records.
func FuzzReadArchive(f *testing.F) {
	signers, _ := softSigners(f)
	// Small records (Ed25519 only): the fuzzer minimizes every new input,
	// which for 5 KiB ML-DSA notes takes most of the run.
	cps := fuzzCheckpoints(f, signers[:1])
	whole := append(archiveRecord(cps[0]), archiveRecord(cps[1])...)
	f.Add(whole)
	f.Add(whole[:len(whole)-3])                               // torn tail
	f.Add(append(bytes.Clone(whole), 0, 0, 0, 0))             // zero length
	f.Add(append(bytes.Clone(whole), 0xff, 0xff, 0xff, 0xff)) // huge length
	f.Add(append(archiveRecord([]byte("x\n")), whole...))     // not a checkpoint
	f.Add([]byte{})
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		// A new file each time: rewriting one in place makes ext4 flush
		// it on close (auto_da_alloc), a hundred times slower.
		tf, err := os.CreateTemp(dir, "checkpoints")
		if err != nil {
			t.Fatal(err)
		}
		path := tf.Name()
		defer os.Remove(path)
		_, err = tf.Write(b)
		if cerr := tf.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		var got []byte
		var end int64
		var rerr error
		for cp, err := range readArchive(path) {
			if err != nil {
				rerr = err
				break
			}
			if len(cp.Note) == 0 || len(cp.Note) > MaxCheckpointSize {
				t.Fatalf("record of %d bytes", len(cp.Note))
			}
			got = append(got, archiveRecord(cp.Note)...)
			end = cp.end
		}
		if !bytes.HasPrefix(b, got) || int64(len(got)) != end {
			t.Fatalf("records re-encode to %d bytes that are not the file's prefix (end %d)", len(got), end)
		}
		a, err := openArchive(path)
		if err != nil {
			if rerr == nil || errors.Is(rerr, errTornTail) {
				t.Fatalf("openArchive refused a readable archive: %v", err)
			}
			return
		}
		a.close()
		after, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(after, got) {
			t.Fatalf("openArchive left %d bytes, want the %d bytes of whole records", len(after), len(got))
		}
	})
}
