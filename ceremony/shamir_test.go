package ceremony

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"testing"
)

// gfMulReference multiplies by carry-less multiplication followed by long
// division by 0x11b: a different construction from gfMul's xtime loop.
func gfMulReference(a, b byte) byte {
	var p uint16
	for i := range 8 {
		if b>>i&1 == 1 {
			p ^= uint16(a) << i
		}
	}
	for i := 15; i >= 8; i-- {
		if p>>i&1 == 1 {
			p ^= 0x11b << (i - 8)
		}
	}
	return byte(p)
}

func TestGFMulKnownAnswers(t *testing.T) {
	// FIPS-197 (AES), section 4.2: {57} • {83} = {c1}, and the xtime chain
	// of section 4.2.1 giving {57} • {13} = {fe}.
	for _, tc := range []struct{ a, b, want byte }{
		{0x57, 0x83, 0xc1},
		{0x57, 0x02, 0xae},
		{0x57, 0x04, 0x47},
		{0x57, 0x08, 0x8e},
		{0x57, 0x10, 0x07},
		{0x57, 0x13, 0xfe},
		{0x80, 0x02, 0x1b},
		{0x53, 0xca, 0x01}, // FIPS-197 5.1.1: {53} and {ca} are inverses
	} {
		if got := gfMul(tc.a, tc.b); got != tc.want {
			t.Errorf("gfMul(%#02x, %#02x) = %#02x, want %#02x", tc.a, tc.b, got, tc.want)
		}
	}
	if got := gfInv(0x53); got != 0xca {
		t.Errorf("gfInv(0x53) = %#02x, want 0xca", got)
	}
}

func TestGFMulMatchesReferences(t *testing.T) {
	// A log/exp table built from the generator 0x03, as a third construction.
	var exp [255]byte
	var log [256]int
	x := byte(1)
	for i := range exp {
		exp[i] = x
		log[x] = i
		x ^= x<<1 ^ 0x1b&-(x>>7) // x * 3 = x * 2 + x
	}
	if x != 1 {
		t.Fatal("0x03 does not generate the multiplicative group")
	}
	for a := range 256 {
		for b := range 256 {
			got := gfMul(byte(a), byte(b))
			if want := gfMulReference(byte(a), byte(b)); got != want {
				t.Fatalf("gfMul(%#02x, %#02x) = %#02x, carry-less reference %#02x", a, b, got, want)
			}
			want := byte(0)
			if a != 0 && b != 0 {
				want = exp[(log[a]+log[b])%255]
			}
			if got != want {
				t.Fatalf("gfMul(%#02x, %#02x) = %#02x, log/exp reference %#02x", a, b, got, want)
			}
		}
	}
}

func TestGFFieldAxioms(t *testing.T) {
	for a := range 256 {
		a := byte(a)
		if gfMul(a, 0) != 0 || gfMul(a, 1) != a {
			t.Fatalf("0 or 1 is not the zero or identity for %#02x", a)
		}
		inv := gfInv(a)
		if a == 0 {
			if inv != 0 {
				t.Fatalf("gfInv(0) = %#02x, want 0", inv)
			}
			continue
		}
		if gfMul(a, inv) != 1 || gfInv(inv) != a {
			t.Fatalf("gfInv(%#02x) = %#02x is not its inverse", a, inv)
		}
		for b := range 256 {
			b := byte(b)
			if gfMul(a, b) != gfMul(b, a) {
				t.Fatalf("not commutative at %#02x, %#02x", a, b)
			}
			if b != 0 && gfMul(a, b) == 0 {
				t.Fatalf("zero divisor: %#02x * %#02x = 0", a, b)
			}
		}
	}
	// Associativity and distributivity over every triple (16M each).
	for a := range 256 {
		for b := range 256 {
			ab := gfMul(byte(a), byte(b))
			for c := range 256 {
				a, b, c := byte(a), byte(b), byte(c)
				if gfMul(ab, c) != gfMul(a, gfMul(b, c)) {
					t.Fatalf("not associative at %#02x, %#02x, %#02x", a, b, c)
				}
				if gfMul(a, b^c) != ab^gfMul(a, c) {
					t.Fatalf("not distributive at %#02x, %#02x, %#02x", a, b, c)
				}
			}
		}
	}
}

func TestShamirKnownAnswer(t *testing.T) {
	// f(x) = 0x42 + 0x07 x + 0x80 x^2, worked by hand:
	// f(1) = 42^07^80 = c5
	// f(2) = 42 ^ 07*2 ^ 80*4 = 42 ^ 0e ^ 36 = 7a
	// f(3) = 42 ^ 07*3 ^ 80*5 = 42 ^ 09 ^ b6 = fd   (3*3 = 5; 80*5 = 36^80)
	shares, err := shamirSplit([]byte{0x42}, 3, 3, bytes.NewReader([]byte{0x07, 0x80}))
	if err != nil {
		t.Fatal(err)
	}
	want := [][]byte{{0xc5, 1}, {0x7a, 2}, {0xfd, 3}}
	for i := range want {
		if !bytes.Equal(shares[i], want[i]) {
			t.Errorf("share %d = %x, want %x", i+1, shares[i], want[i])
		}
	}
	got, err := shamirCombine([][]byte{want[2], want[0], want[1]})
	if err != nil || !bytes.Equal(got, []byte{0x42}) {
		t.Errorf("shamirCombine = %x, %v; want 42", got, err)
	}
}

func TestShamirRoundTrip(t *testing.T) {
	for _, p := range []struct{ m, n int }{{2, 2}, {2, 3}, {3, 5}, {5, 5}, {4, 9}, {10, 20}, {255, 255}} {
		t.Run(fmt.Sprintf("%d-of-%d", p.m, p.n), func(t *testing.T) {
			for _, size := range []int{1, 32, 128} {
				secret := make([]byte, size)
				rand.Read(secret)
				shares, err := shamirSplit(secret, p.n, p.m, nil)
				if err != nil {
					t.Fatal(err)
				}
				if len(shares) != p.n {
					t.Fatalf("%d shares, want %d", len(shares), p.n)
				}
				for range 5 {
					perm := mrand.Perm(p.n)
					subset := make([][]byte, 0, p.n)
					for _, i := range perm[:p.m+mrand.IntN(p.n-p.m+1)] {
						subset = append(subset, shares[i])
					}
					got, err := shamirCombine(subset)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, secret) {
						t.Fatalf("combining %d shares did not give the secret", len(subset))
					}
				}
			}
		})
	}
}

func TestShamirEverySubsetOf3of5(t *testing.T) {
	secret := make([]byte, 128)
	rand.Read(secret)
	shares, err := shamirSplit(secret, 5, 3, nil)
	if err != nil {
		t.Fatal(err)
	}
	for mask := 1; mask < 1<<5; mask++ {
		var subset [][]byte
		for i := range 5 {
			if mask>>i&1 == 1 {
				subset = append(subset, shares[i])
			}
		}
		got, err := shamirCombine(subset)
		switch {
		case len(subset) == 1:
			if !errors.Is(err, errShamirShares) {
				t.Errorf("mask %05b: one share: err = %v, want errShamirShares", mask, err)
			}
		case len(subset) < 3:
			if err != nil || bytes.Equal(got, secret) {
				t.Errorf("mask %05b: %d shares gave the secret (err %v)", mask, len(subset), err)
			}
		default:
			if err != nil || !bytes.Equal(got, secret) {
				t.Errorf("mask %05b: %d shares did not give the secret (err %v)", mask, len(subset), err)
			}
		}
	}
}

// TestShamirPerfectSecrecy checks, exhaustively for one secret byte and a
// 3-of-5 split, that any two shares are uniformly distributed whatever the
// secret: over all 65536 coefficient pairs, each pair of y values occurs
// exactly once. So two shares leave every candidate secret equally likely.
func TestShamirPerfectSecrecy(t *testing.T) {
	for _, xs := range [][2]int{{1, 2}, {2, 5}, {3, 4}} {
		for _, s := range []byte{0x00, 0x5a, 0xff} {
			var seen [1 << 16]bool
			for c := range 1 << 16 {
				shares, err := shamirSplit([]byte{s}, 5, 3, bytes.NewReader([]byte{byte(c), byte(c >> 8)}))
				if err != nil {
					t.Fatal(err)
				}
				y := int(shares[xs[0]-1][0])<<8 | int(shares[xs[1]-1][0])
				if seen[y] {
					t.Fatalf("shares %v, secret %#02x: y pair %#04x occurs twice", xs, s, y)
				}
				seen[y] = true
			}
		}
	}
}

func TestShamirSplitRejects(t *testing.T) {
	for _, tc := range []struct {
		name   string
		secret []byte
		n, m   int
	}{
		{"empty secret", nil, 3, 2},
		{"threshold 1", []byte{1}, 3, 1},
		{"threshold 0", []byte{1}, 3, 0},
		{"threshold above n", []byte{1}, 3, 4},
		{"n above 255", []byte{1}, 256, 2},
	} {
		if _, err := shamirSplit(tc.secret, tc.n, tc.m, nil); !errors.Is(err, errShamirParams) {
			t.Errorf("%s: err = %v, want errShamirParams", tc.name, err)
		}
	}
	errBroken := errors.New("broken reader")
	if _, err := shamirSplit([]byte{1, 2}, 3, 2, shamirFailReader{errBroken}); !errors.Is(err, errBroken) {
		t.Errorf("failing rand: err = %v, want %v", err, errBroken)
	}
	if _, err := shamirSplit([]byte{1, 2}, 3, 3, bytes.NewReader([]byte{1, 2, 3})); err == nil {
		t.Error("short rand: no error")
	}
}

type shamirFailReader struct{ err error }

func (r shamirFailReader) Read([]byte) (int, error) { return 0, r.err }

func TestShamirCombineRejects(t *testing.T) {
	shares, err := shamirSplit([]byte{1, 2, 3}, 3, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	zeroX := bytes.Clone(shares[1])
	zeroX[3] = 0
	tooMany := make([][]byte, 256)
	for i := range tooMany {
		tooMany[i] = []byte{0, byte(i)}
	}
	for _, tc := range []struct {
		name   string
		shares [][]byte
	}{
		{"none", nil},
		{"one", shares[:1]},
		{"duplicate x", [][]byte{shares[0], shares[1], shares[0]}},
		{"zero x", [][]byte{shares[0], zeroX}},
		{"unequal lengths", [][]byte{shares[0], shares[1][1:]}},
		{"too short", [][]byte{{1}, {2}}},
		{"too many", tooMany},
	} {
		if got, err := shamirCombine(tc.shares); !errors.Is(err, errShamirShares) || got != nil {
			t.Errorf("%s: got %x, err = %v, want errShamirShares", tc.name, got, err)
		}
	}
}
