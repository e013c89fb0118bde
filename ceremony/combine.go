package ceremony

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"
)

// CombineShares rebuilds the secret from opened shares. If expect (the
// ceremony's public record) is non-nil every share must carry its ceremony
// ID, label, key, threshold, total and digest, and the custodian recorded
// for its index; either way all shares must agree on those. It verifies
// every share's signature, needs distinct indexes and at least Threshold
// shares, and checks the rebuilt secret against the digest. Errors: a
// *ShareError per share at fault (joined; ErrMalformedShare,
// ErrBadSignature, ErrForeignShare, ErrDuplicateShare), ErrTooFewShares
// (saying how many were given and needed), or ErrSecretMismatch, with a
// *ShareError naming the inconsistent share when more than Threshold
// shares allow telling which. The caller must clear the returned secret.
func CombineShares(shares []*Share, expect *CeremonyPublic) ([]byte, error) {
	if expect != nil {
		if err := expect.validate(); err != nil {
			return nil, err
		}
	}
	var errs []error
	for i, s := range shares {
		if s == nil {
			return nil, fmt.Errorf("ceremony: share #%d of %d given is nil", i+1, len(shares))
		}
		if err := shareVerify(s); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	ref := shareReference(shares, expect)
	seen := map[int]bool{}
	for _, s := range shares {
		if diff := ref.diff(s); diff != "" {
			errs = append(errs, shareErr(s, ErrForeignShare, "does not match %s: different %s", ref.source, diff))
		} else if expect != nil && len(expect.Shares) > 0 && expect.Shares[s.Index-1].Custodian != s.Custodian {
			errs = append(errs, shareErr(s, ErrForeignShare, "the ceremony record gives index %d to custodian %q", s.Index, expect.Shares[s.Index-1].Custodian))
		} else if seen[s.Index] {
			errs = append(errs, shareErr(s, ErrDuplicateShare, "index %d given twice", s.Index))
		}
		seen[s.Index] = true
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(shares) < ref.Threshold || len(shares) == 0 {
		return nil, fmt.Errorf("%w: %d given, %d needed", ErrTooFewShares, len(shares), max(ref.Threshold, 2))
	}
	if secret, ok := shareTryCombine(shares, ref); ok {
		return secret, nil
	}
	return nil, shareExplainMismatch(shares, ref)
}

// shareCeremony is what every share of one ceremony has in common.
type shareCeremony struct {
	CeremonyID, Label string
	Threshold, Total  int
	Key, Digest       string
	source            string // "the ceremony record" or "the other shares"
}

func shareCeremonyOf(s *Share) shareCeremony {
	return shareCeremony{s.CeremonyID, s.Label, s.Threshold, s.Total, string(s.CeremonyKey), string(s.SecretDigest), "the other shares"}
}

// diff names the fields in which s differs from c ("" if none).
func (c shareCeremony) diff(s *Share) string {
	o := shareCeremonyOf(s)
	var d []string
	for _, f := range []struct {
		name string
		same bool
	}{
		{"ceremony ID", o.CeremonyID == c.CeremonyID}, {"label", o.Label == c.Label},
		{"threshold", o.Threshold == c.Threshold}, {"total", o.Total == c.Total},
		{"ceremony key", o.Key == c.Key}, {"secret digest", o.Digest == c.Digest},
	} {
		if !f.same {
			d = append(d, f.name)
		}
	}
	return strings.Join(d, ", ")
}

// shareReference is the ceremony the shares must match: expect's if given,
// else the one most shares carry (the earliest on a tie).
func shareReference(shares []*Share, expect *CeremonyPublic) shareCeremony {
	if expect != nil {
		return shareCeremony{expect.CeremonyID, expect.Label, expect.Threshold, expect.Total,
			string(expect.CeremonyKey), string(expect.SecretDigest), "the ceremony record"}
	}
	var best shareCeremony
	counts, bestN := map[shareCeremony]int{}, 0
	for _, s := range shares {
		c := shareCeremonyOf(s)
		if counts[c]++; counts[c] > bestN {
			best, bestN = c, counts[c]
		}
	}
	return best
}

func (p *CeremonyPublic) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("ceremony: invalid ceremony record: "+format, args...)
	}
	switch {
	case p.Version != ShareVersion:
		return bad("version %d, want %d", p.Version, ShareVersion)
	case p.Total < 2 || p.Total > shamirMaxShares || p.Threshold < 2 || p.Threshold > p.Total:
		return bad("threshold %d of %d is out of range", p.Threshold, p.Total)
	case len(p.CeremonyKey) != ed25519.PublicKeySize || len(p.SecretDigest) != sha256.Size:
		return bad("ceremony key or secret digest has the wrong size")
	case len(p.Shares) != 0 && len(p.Shares) != p.Total:
		return bad("%d share records for %d shares", len(p.Shares), p.Total)
	}
	for i, r := range p.Shares {
		if r.Index != i+1 {
			return bad("shares[%d] has index %d", i, r.Index)
		}
	}
	return nil
}

// shareTryCombine combines shares and checks the result against the
// ceremony's digest; a wrong result is cleared.
func shareTryCombine(shares []*Share, ref shareCeremony) ([]byte, bool) {
	data := make([][]byte, len(shares))
	for i, s := range shares {
		data[i] = s.Data
	}
	secret, err := shamirCombine(data)
	if err != nil {
		return nil, false
	}
	digest := shareSecretDigest(ref.CeremonyID, secret)
	if subtle.ConstantTimeCompare(digest, []byte(ref.Digest)) != 1 {
		clear(secret)
		return nil, false
	}
	return secret, true
}

// shareExplainMismatch builds ErrSecretMismatch's error. With more than
// Threshold shares it looks (within shareMaxTries subsets) for Threshold
// shares that rebuild the secret, then names every share that does not
// rebuild it together with Threshold-1 of those.
func shareExplainMismatch(shares []*Share, ref shareCeremony) error {
	m := ref.Threshold
	base := fmt.Errorf("%w (%d shares given, threshold %d)", ErrSecretMismatch, len(shares), m)
	if len(shares) == m {
		return fmt.Errorf("%w: cannot tell which share is wrong with only %d; give more", base, m)
	}
	good := shareFindGoodSubset(shares, ref)
	if good == nil {
		return fmt.Errorf("%w: no %d of them rebuild it", base, m)
	}
	errs := []error{base}
	inGood := map[*Share]bool{}
	for _, s := range good {
		inGood[s] = true
	}
	for _, s := range shares {
		if inGood[s] {
			continue
		}
		secret, ok := shareTryCombine(append(good[:m-1:m-1], s), ref)
		clear(secret)
		if !ok {
			errs = append(errs, shareErr(s, ErrSecretMismatch, "inconsistent with the other shares: with them it rebuilds a wrong secret"))
		}
	}
	return errors.Join(errs...)
}

// shareFindGoodSubset returns Threshold shares that rebuild the secret, or
// nil, trying subsets in lexicographic order.
func shareFindGoodSubset(shares []*Share, ref shareCeremony) []*Share {
	m, n := ref.Threshold, len(shares)
	idx := make([]int, m)
	for i := range idx {
		idx[i] = i
	}
	subset := make([]*Share, m)
	for range shareMaxTries {
		for i, j := range idx {
			subset[i] = shares[j]
		}
		if secret, ok := shareTryCombine(subset, ref); ok {
			clear(secret)
			return subset
		}
		i := m - 1
		for i >= 0 && idx[i] == n-m+i {
			i--
		}
		if i < 0 {
			return nil
		}
		idx[i]++
		for j := i + 1; j < m; j++ {
			idx[j] = idx[j-1] + 1
		}
	}
	return nil
}
