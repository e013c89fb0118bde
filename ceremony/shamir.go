package ceremony

// Shamir's secret sharing over GF(2^8), byte by byte.
//
// The field is GF(2)[x]/(x^8 + x^4 + x^3 + x + 1), the AES field (0x11b).
// A share is the evaluations of one random polynomial per secret byte at
// the share's x-coordinate, followed by that x-coordinate as its last byte
// (the layout of HashiCorp Vault's shamir package). Shares are numbered
// x = 1..n: x = 0 would be the secret itself.
//
// Every operation on secret values (multiplication, inversion, polynomial
// evaluation, interpolation) runs in time independent of those values: no
// tables are indexed and no branch is taken on secret data. Only the
// x-coordinates, which are public, steer the loops.

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
)

// shamirMaxShares is the largest n: x-coordinates are the non-zero bytes.
const shamirMaxShares = 255

var (
	errShamirParams = errors.New("ceremony: shamir: invalid parameters")
	errShamirShares = errors.New("ceremony: shamir: invalid shares")
)

// gfMul multiplies a and b in GF(2^8) mod 0x11b in constant time: eight
// rounds of "if b's low bit is set, add a; then a = xtime(a)", with the
// conditions turned into masks.
func gfMul(a, b byte) byte {
	var p byte
	for range 8 {
		p ^= a & -(b & 1)       // mask is 0xff when the low bit of b is set
		a = a<<1 ^ 0x1b&-(a>>7) // xtime: reduce by 0x11b when bit 7 falls out
		b >>= 1
	}
	return p
}

// gfInv returns the multiplicative inverse of a (a^254, since a^255 = 1 for
// a != 0), and 0 for 0. It is constant time: a fixed chain of squarings and
// multiplications.
func gfInv(a byte) byte {
	// 254 = 0b11111110: a^254 = a^2 * a^4 * ... * a^128.
	var r byte = 1
	sq := a
	for range 7 {
		sq = gfMul(sq, sq) // a^2, a^4, ..., a^128
		r = gfMul(r, sq)
	}
	return r
}

// shamirSplit splits secret into n shares, any m of which rebuild it with
// shamirCombine; fewer than m reveal nothing about it. 2 <= m <= n <= 255
// and the secret must not be empty. rand (crypto/rand.Reader if nil)
// supplies the polynomials' coefficients: for each secret byte in turn,
// m-1 bytes a_1..a_{m-1}, so share x holds s + a_1 x + ... + a_{m-1} x^{m-1}.
// Each share is len(secret)+1 bytes: the y values, then x. The coefficients
// are cleared before returning; the shares are the caller's to clear.
func shamirSplit(secret []byte, n, m int, rand io.Reader) ([][]byte, error) {
	switch {
	case len(secret) == 0:
		return nil, fmt.Errorf("%w: empty secret", errShamirParams)
	case m < 2:
		return nil, fmt.Errorf("%w: threshold %d is below 2", errShamirParams, m)
	case n < m:
		return nil, fmt.Errorf("%w: %d shares is below the threshold %d", errShamirParams, n, m)
	case n > shamirMaxShares:
		return nil, fmt.Errorf("%w: %d shares is above %d", errShamirParams, n, shamirMaxShares)
	}
	if rand == nil {
		rand = shamirDefaultRand
	}
	coeffs := make([]byte, len(secret)*(m-1))
	defer clear(coeffs)
	if _, err := io.ReadFull(rand, coeffs); err != nil {
		return nil, fmt.Errorf("ceremony: shamir: reading randomness: %w", err)
	}
	shares := make([][]byte, n)
	for i := range shares {
		shares[i] = make([]byte, len(secret)+1)
		shares[i][len(secret)] = byte(i + 1)
	}
	for k, s := range secret {
		c := coeffs[k*(m-1) : (k+1)*(m-1)]
		for i := range shares {
			shares[i][k] = shamirEval(s, c, byte(i+1))
		}
	}
	return shares, nil
}

// shamirDefaultRand is crypto/rand.Reader, named so the import does not
// clash with the parameters called rand.
var shamirDefaultRand = rand.Reader

// shamirEval evaluates s + c[0] x + c[1] x^2 + ... at x by Horner's rule.
func shamirEval(s byte, c []byte, x byte) byte {
	var y byte
	for j := len(c) - 1; j >= 0; j-- {
		y = gfMul(y, x) ^ c[j]
	}
	return gfMul(y, x) ^ s
}

// shamirCombine rebuilds a secret from shares made by shamirSplit by
// Lagrange interpolation at x = 0. It needs at least two shares of equal
// length (at least 2 bytes) with distinct non-zero x-coordinates. Given
// fewer shares than the threshold, or shares of different splits, it
// returns a wrong secret without an error: callers check a digest.
func shamirCombine(shares [][]byte) ([]byte, error) {
	if len(shares) < 2 {
		return nil, fmt.Errorf("%w: %d given, at least 2 needed", errShamirShares, len(shares))
	}
	if len(shares) > shamirMaxShares {
		return nil, fmt.Errorf("%w: %d given, at most %d allowed", errShamirShares, len(shares), shamirMaxShares)
	}
	size := len(shares[0])
	if size < 2 {
		return nil, fmt.Errorf("%w: share of %d bytes is too short", errShamirShares, size)
	}
	xs := make([]byte, len(shares))
	var seen [256]bool
	for i, sh := range shares {
		if len(sh) != size {
			return nil, fmt.Errorf("%w: shares have different lengths", errShamirShares)
		}
		x := sh[size-1]
		if x == 0 {
			return nil, fmt.Errorf("%w: share with x-coordinate 0", errShamirShares)
		}
		if seen[x] {
			return nil, fmt.Errorf("%w: x-coordinate %d given twice", errShamirShares, x)
		}
		seen[x] = true
		xs[i] = x
	}
	secret := make([]byte, size-1)
	for i, sh := range shares {
		l := shamirBasisAtZero(xs, i)
		for k := range secret {
			secret[k] ^= gfMul(l, sh[k])
		}
	}
	return secret, nil
}

// shamirBasisAtZero is the Lagrange basis polynomial of point i evaluated
// at 0: the product over j != i of x_j / (x_j - x_i), where subtraction is
// XOR. The x-coordinates are distinct, so no denominator is zero.
func shamirBasisAtZero(xs []byte, i int) byte {
	var num, den byte = 1, 1
	for j, xj := range xs {
		if j == i {
			continue
		}
		num = gfMul(num, xj)
		den = gfMul(den, xj^xs[i])
	}
	return gfMul(num, gfInv(den))
}
