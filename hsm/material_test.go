package hsm_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/hsmd/hsmd/hsm"
)

// testMaterial returns deterministic root material for seed.
func testMaterial(t testing.TB, seed byte) *hsm.RootMaterial {
	t.Helper()
	m, err := hsm.NewRootMaterial(rand.NewChaCha8([32]byte{seed}))
	if err != nil {
		t.Fatalf("NewRootMaterial: %v", err)
	}
	t.Cleanup(m.Clear)
	return m
}

func TestRootMaterialMarshalParse(t *testing.T) {
	m := testMaterial(t, 1)
	b := m.Marshal()
	if len(b) != hsm.RootMaterialSize || hsm.RootMaterialSize != 129 || b[0] != 1 {
		t.Fatalf("Marshal: %d bytes, version %d", len(b), b[0])
	}
	want := bytes.Join([][]byte{{1}, m.KDK, m.Wrap, m.Ed25519Seed, m.P256Scalar}, nil)
	if !bytes.Equal(b, want) {
		t.Fatal("Marshal layout is not version || KDK || Wrap || Ed25519Seed || P256Scalar")
	}
	p, err := hsm.ParseRootMaterial(b)
	if err != nil {
		t.Fatal(err)
	}
	clear(b) // the parsed material must not alias its input
	if !bytes.Equal(p.Marshal(), want) {
		t.Fatal("ParseRootMaterial(Marshal()) differs")
	}
	p.Clear()
	if p.KDK != nil || p.Wrap != nil || p.Ed25519Seed != nil || p.P256Scalar != nil {
		t.Fatal("Clear left fields set")
	}
	if err := p.Validate(); !errors.Is(err, hsm.ErrInvalidMaterial) {
		t.Fatalf("Validate after Clear = %v", err)
	}
	if other := testMaterial(t, 2); bytes.Equal(other.KDK, m.KDK) {
		t.Fatal("two seeds gave the same material")
	}
}

func TestParseRootMaterialErrors(t *testing.T) {
	good := testMaterial(t, 1).Marshal()
	// N, the order of P-256.
	order := []byte{0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
		0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51}
	withScalar := func(s []byte) []byte {
		b := bytes.Clone(good)
		copy(b[1+96:], s)
		return b
	}
	for name, b := range map[string][]byte{
		"empty":        nil,
		"short":        good[:128],
		"long":         append(bytes.Clone(good), 0),
		"version 0":    append([]byte{0}, good[1:]...),
		"version 2":    append([]byte{2}, good[1:]...),
		"zero scalar":  withScalar(make([]byte, 32)),
		"scalar N":     withScalar(order),
		"scalar 2^256": withScalar(bytes.Repeat([]byte{0xff}, 32)),
		"zero kdk":     append(append([]byte{1}, make([]byte, 32)...), good[33:]...),
	} {
		m, err := hsm.ParseRootMaterial(b)
		if !errors.Is(err, hsm.ErrInvalidMaterial) || m != nil {
			t.Errorf("%s: ParseRootMaterial = %v, %v; want ErrInvalidMaterial", name, m, err)
			continue
		}
		if strings.Contains(err.Error(), hex.EncodeToString(good[1:9])) {
			t.Errorf("%s: error shows key bytes: %v", name, err)
		}
	}
}

// scriptedReader returns its chunks in turn, then errors.
type scriptedReader struct{ chunks [][]byte }

func (r *scriptedReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(p, r.chunks[0])
	r.chunks = r.chunks[1:]
	return n, nil
}

func TestNewRootMaterialRejectsBadScalars(t *testing.T) {
	k := func(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }
	r := &scriptedReader{chunks: [][]byte{k(1), k(2), k(3), k(0xff), make([]byte, 32), k(4)}}
	m, err := hsm.NewRootMaterial(r)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Clear()
	if !bytes.Equal(m.KDK, k(1)) || !bytes.Equal(m.Wrap, k(2)) || !bytes.Equal(m.Ed25519Seed, k(3)) || !bytes.Equal(m.P256Scalar, k(4)) {
		t.Fatal("NewRootMaterial did not skip the scalars >= N and 0")
	}
	always := &scriptedReader{}
	for range 100 {
		always.chunks = append(always.chunks, k(0xff))
	}
	if _, err := hsm.NewRootMaterial(always); !errors.Is(err, hsm.ErrInvalidMaterial) {
		t.Fatalf("NewRootMaterial from a reader of 0xff = %v, want ErrInvalidMaterial", err)
	}
	if _, err := hsm.NewRootMaterial(&scriptedReader{}); err == nil {
		t.Fatal("NewRootMaterial with a failing reader succeeded")
	}
	m2, err := hsm.NewRootMaterial(nil) // crypto/rand
	if err != nil {
		t.Fatal(err)
	}
	m2.Clear()
}

func TestRootMaterialNeverPrints(t *testing.T) {
	m := testMaterial(t, 1)
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("x", "m", m, "v", *m)
	slog.New(slog.NewTextHandler(&logged, nil)).Info("x", "m", m)
	out := fmt.Sprintf("%v %+v %#v %s %x %v %+v %#v %q", m, m, m, m, m, *m, *m, *m, *m) + logged.String()
	for _, secret := range [][]byte{m.KDK, m.Wrap, m.Ed25519Seed, m.P256Scalar} {
		for _, enc := range []string{hex.EncodeToString(secret[:8]), fmt.Sprint(secret[:8])[1:12], string(secret[:8])} {
			if strings.Contains(out, enc) {
				t.Fatalf("printing the material shows key bytes: %s", out)
			}
		}
	}
	if !strings.Contains(out, "REDACTED") {
		t.Fatalf("material prints as %s", out)
	}
}

func FuzzParseRootMaterial(f *testing.F) {
	good := testMaterial(f, 1).Marshal()
	for _, seed := range [][]byte{good, testMaterial(f, 2).Marshal(), append([]byte{2}, good[1:]...), good[:64], nil} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := hsm.ParseRootMaterial(b)
		if err != nil {
			if m != nil || !errors.Is(err, hsm.ErrInvalidMaterial) {
				t.Fatalf("ParseRootMaterial = %v, %v", m, err)
			}
			return
		}
		if out := m.Marshal(); !bytes.Equal(out, b) {
			t.Fatalf("Marshal(Parse(b)) != b")
		}
	})
}
