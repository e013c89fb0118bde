package ceremony

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"filippo.io/age"
	"filippo.io/age/armor"
)

var shareTestNames = []string{"alice", "bob", "carol", "dave", "erin"}

// shareTestCeremony is a 3-of-5 split of a 128-byte secret; custodians 2
// and 4 (bob, dave) have hybrid post-quantum recipients, the others X25519.
type shareTestCeremony struct {
	secret     []byte
	custodians []Custodian
	identities []age.Identity
	sealed     []SealedShare
	pub        CeremonyPublic
}

func newShareTestCeremony(t *testing.T, id string) *shareTestCeremony {
	t.Helper()
	c := &shareTestCeremony{secret: make([]byte, 128)}
	rand.Read(c.secret)
	for i, name := range shareTestNames {
		var id age.Identity
		var rec string
		if i%2 == 1 {
			h, err := age.GenerateHybridIdentity()
			if err != nil {
				t.Fatal(err)
			}
			id, rec = h, h.Recipient().String()
		} else {
			x, err := age.GenerateX25519Identity()
			if err != nil {
				t.Fatal(err)
			}
			id, rec = x, x.Recipient().String()
		}
		c.identities = append(c.identities, id)
		c.custodians = append(c.custodians, Custodian{Name: name, Recipient: rec})
	}
	var err error
	c.sealed, c.pub, err = SplitSecret(c.secret, SplitParams{CeremonyID: id, Label: "root v1", Threshold: 3, Custodians: c.custodians})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// open opens every sealed share with its custodian's identity.
func (c *shareTestCeremony) open(t *testing.T) []*Share {
	t.Helper()
	shares := make([]*Share, len(c.sealed))
	for i, s := range c.sealed {
		sh, err := OpenShare(s.Ciphertext, c.identities[i])
		if err != nil {
			t.Fatalf("OpenShare(share %d): %v", s.Index, err)
		}
		shares[i] = sh
	}
	return shares
}

// shareTestNoSecret fails if err's text holds the secret in any usual form.
func shareTestNoSecret(t *testing.T, err error, secret []byte) {
	t.Helper()
	msg := err.Error()
	for _, form := range []string{string(secret), hex.EncodeToString(secret), base64.StdEncoding.EncodeToString(secret)} {
		if strings.Contains(msg, form) {
			t.Fatalf("error leaks the secret: %v", err)
		}
	}
}

// shareTestNamed checks that err names the share index and custodian with
// cause.
func shareTestNamed(t *testing.T, err error, index int, custodian string, cause error) {
	t.Helper()
	var se *ShareError
	if !errors.As(err, &se) || !errors.Is(err, cause) {
		t.Fatalf("err = %v, want a *ShareError wrapping %v", err, cause)
	}
	if se.Index != index || se.Custodian != custodian {
		t.Fatalf("error names share %d (%q), want %d (%q): %v", se.Index, se.Custodian, index, custodian, err)
	}
	if want := fmt.Sprintf("share %d (custodian %q)", index, custodian); !strings.Contains(err.Error(), want) {
		t.Fatalf("error text %q lacks %q", err, want)
	}
}

func TestSplitOpenCombine(t *testing.T) {
	c := newShareTestCeremony(t, "root-init-2026-01")
	if c.pub.Threshold != 3 || c.pub.Total != 5 || len(c.pub.Shares) != 5 || len(c.pub.CeremonyKey) != ed25519.PublicKeySize ||
		!bytes.Equal(c.pub.SecretDigest, shareSecretDigest("root-init-2026-01", c.secret)) {
		t.Fatalf("unexpected public record %+v", c.pub)
	}
	for i, s := range c.sealed {
		sum := sha256.Sum256(s.Ciphertext)
		if s.Index != i+1 || s.Custodian != shareTestNames[i] || !bytes.Equal(s.SHA256, sum[:]) ||
			!bytes.HasPrefix(s.Ciphertext, []byte(armor.Header)) {
			t.Fatalf("sealed share %d: index %d, custodian %q, bad hash or not armored", i, s.Index, s.Custodian)
		}
		if err := c.pub.CheckSealed(s.Index, s.Ciphertext); err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(s.Ciphertext, []byte(s.Custodian)) {
			t.Fatalf("sealed share %d is not encrypted", s.Index)
		}
	}
	shares := c.open(t)
	for i, s := range shares {
		if s.Index != i+1 || s.Custodian != shareTestNames[i] || s.Label != "root v1" || s.Threshold != 3 || s.Total != 5 {
			t.Fatalf("opened share %d: %v", i+1, s)
		}
	}
	for mask := range 1 << 5 {
		var subset []*Share
		for i := range 5 {
			if mask>>i&1 == 1 {
				subset = append(subset, shares[i])
			}
		}
		if len(subset) < 3 {
			continue
		}
		for _, expect := range []*CeremonyPublic{&c.pub, nil} {
			got, err := CombineShares(subset, expect)
			if err != nil || !bytes.Equal(got, c.secret) {
				t.Fatalf("mask %05b (expect %v): did not rebuild the secret: %v", mask, expect != nil, err)
			}
		}
	}
}

func TestOpenShareBinary(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	bin, err := io.ReadAll(armor.NewReader(bytes.NewReader(c.sealed[1].Ciphertext)))
	if err != nil {
		t.Fatal(err)
	}
	s, err := OpenShare(bin, c.identities[1])
	if err != nil || s.Index != 2 {
		t.Fatalf("OpenShare(binary) = %v, %v", s, err)
	}
}

func TestCombineTooFewShares(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	shares := c.open(t)
	for _, expect := range []*CeremonyPublic{&c.pub, nil} {
		got, err := CombineShares(shares[1:3], expect)
		if !errors.Is(err, ErrTooFewShares) || got != nil {
			t.Fatalf("2 shares: got %d bytes, err = %v; want ErrTooFewShares", len(got), err)
		}
		if !strings.Contains(err.Error(), "2 given, 3 needed") {
			t.Errorf("error %q does not say how many were given and needed", err)
		}
	}
	if _, err := CombineShares(nil, &c.pub); !errors.Is(err, ErrTooFewShares) {
		t.Errorf("no shares: err = %v, want ErrTooFewShares", err)
	}
}

func TestOpenShareAlteredCiphertext(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	lines := strings.Split(string(c.sealed[2].Ciphertext), "\n")
	// Line 1 is in the age header (recipient stanza), the line before the
	// footer is in the payload.
	for _, line := range []int{1, len(lines) - 3} {
		l := []byte(lines[line])
		if l[0] == 'A' {
			l[0] = 'B'
		} else {
			l[0] = 'A'
		}
		altered := strings.Join(append(append(append([]string{}, lines[:line]...), string(l)), lines[line+1:]...), "\n")
		for i, s := range c.sealed {
			ct := s.Ciphertext
			if i == 2 {
				ct = []byte(altered)
			}
			_, err := OpenShare(ct, c.identities[i])
			if i != 2 {
				if err != nil {
					t.Fatalf("share %d: %v", s.Index, err)
				}
				continue
			}
			if !errors.Is(err, ErrShareDecrypt) {
				t.Fatalf("altered line %d of share %d: err = %v, want ErrShareDecrypt", line, s.Index, err)
			}
			shareTestNamed(t, c.pub.CheckSealed(s.Index, ct), 3, "carol", ErrCiphertextMismatch)
		}
	}
}

// TestForgedShare simulates custodian bob forging his share: he changes
// Data, keeps the signature, and re-encrypts to his own recipient.
func TestForgedShare(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	shares := c.open(t)
	forged := *shares[1]
	forged.Data = bytes.Clone(forged.Data)
	forged.Data[0] ^= 0x01
	rec, err := ParseRecipient(c.custodians[1].Recipient)
	if err != nil {
		t.Fatal(err)
	}
	ct, err := shareSeal(&forged, rec)
	if err != nil {
		t.Fatal(err)
	}
	_, err = OpenShare(ct, c.identities[1])
	shareTestNamed(t, err, 2, "bob", ErrBadSignature)

	for _, expect := range []*CeremonyPublic{&c.pub, nil} {
		got, err := CombineShares([]*Share{shares[0], &forged, shares[2], shares[3]}, expect)
		if got != nil {
			t.Fatal("a forged share gave a secret")
		}
		shareTestNamed(t, err, 2, "bob", ErrBadSignature)
		shareTestNoSecret(t, err, c.secret)
	}
}

// TestInconsistentSignedShare covers a share that is validly signed (as if
// the ceremony key had leaked) but does not rebuild the secret: named when
// more than Threshold shares are given.
func TestInconsistentSignedShare(t *testing.T) {
	secret := bytes.Repeat([]byte{0x5c}, 64)
	p := SplitParams{CeremonyID: "root-init", Threshold: 3, Custodians: []Custodian{{Name: "a"}, {Name: "b"}, {Name: "c"}, {Name: "d"}, {Name: "e"}}}
	_, priv, _ := ed25519.GenerateKey(nil)
	for _, tc := range []struct{ bad, given int }{{2, 4}, {0, 5}, {4, 5}} {
		shares, err := shareMakeAll(secret, p, priv, nil)
		if err != nil {
			t.Fatal(err)
		}
		shares[tc.bad].Data[5] ^= 0x80
		shareSign(shares[tc.bad], priv)
		got, err := CombineShares(shares[:tc.given], nil)
		if got != nil || !errors.Is(err, ErrSecretMismatch) {
			t.Fatalf("err = %v, want ErrSecretMismatch", err)
		}
		shareTestNamed(t, err, tc.bad+1, p.Custodians[tc.bad].Name, ErrSecretMismatch)
		shareTestNoSecret(t, err, secret)
		if n := strings.Count(err.Error(), "custodian"); n != 1 {
			t.Fatalf("%d shares named, want 1: %v", n, err)
		}
	}
	shares, err := shareMakeAll(secret, p, priv, nil)
	if err != nil {
		t.Fatal(err)
	}
	shares[2].Data[5] ^= 0x80
	shareSign(shares[2], priv)
	_, err = CombineShares(shares[:3], nil)
	var se *ShareError
	if !errors.Is(err, ErrSecretMismatch) || errors.As(err, &se) {
		t.Fatalf("exactly Threshold shares: err = %v, want an unnamed ErrSecretMismatch", err)
	}
	if got, err := CombineShares([]*Share{shares[4], shares[0], shares[3]}, nil); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("good shares: %v", err)
	}
}

func TestForeignShare(t *testing.T) {
	a := newShareTestCeremony(t, "root-init")
	b := newShareTestCeremony(t, "root-init") // same ID, another run
	other := newShareTestCeremony(t, "rotate-kdk")
	as, bs, os := a.open(t), b.open(t), other.open(t)
	for _, foreign := range []*Share{bs[2], os[2]} {
		for _, expect := range []*CeremonyPublic{&a.pub, nil} {
			got, err := CombineShares([]*Share{as[0], as[1], foreign, as[3]}, expect)
			if got != nil {
				t.Fatal("mixed shares gave a secret")
			}
			shareTestNamed(t, err, 3, "carol", ErrForeignShare)
			var se *ShareError
			errors.As(err, &se)
			if !strings.Contains(se.Reason, "ceremony key") || !strings.Contains(se.Reason, "secret digest") {
				t.Errorf("reason %q does not say what differs", se.Reason)
			}
		}
	}
}

func TestCombineExpectMismatch(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	shares := c.open(t)[:3]
	for _, tc := range []struct {
		name   string
		change func(p *CeremonyPublic)
		what   string
	}{
		{"ceremony ID", func(p *CeremonyPublic) { p.CeremonyID = "other" }, "ceremony ID"},
		{"label", func(p *CeremonyPublic) { p.Label = "root v2" }, "label"},
		{"threshold", func(p *CeremonyPublic) { p.Threshold = 2 }, "threshold"},
		{"total", func(p *CeremonyPublic) { p.Total = 6; p.Shares = nil }, "total"},
		{"key", func(p *CeremonyPublic) { p.CeremonyKey = bytes.Repeat([]byte{1}, 32) }, "ceremony key"},
		{"digest", func(p *CeremonyPublic) { p.SecretDigest = make([]byte, 32) }, "secret digest"},
		{"custodian", func(p *CeremonyPublic) { p.Shares[0].Custodian = "mallory" }, "mallory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expect := c.pub
			expect.Shares = append([]ShareRecord(nil), c.pub.Shares...)
			tc.change(&expect)
			got, err := CombineShares(shares, &expect)
			if got != nil || !errors.Is(err, ErrForeignShare) || !strings.Contains(err.Error(), tc.what) {
				t.Fatalf("err = %v, want ErrForeignShare mentioning %q", err, tc.what)
			}
			shareTestNamed(t, err, 1, "alice", ErrForeignShare)
		})
	}
	bad := c.pub
	bad.CeremonyKey = nil
	if _, err := CombineShares(shares, &bad); err == nil || !strings.Contains(err.Error(), "invalid ceremony record") {
		t.Fatalf("invalid record: err = %v", err)
	}
}

func TestCombineDuplicateIndex(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	shares := c.open(t)
	_, err := CombineShares([]*Share{shares[0], shares[1], shares[1], shares[2]}, &c.pub)
	shareTestNamed(t, err, 2, "bob", ErrDuplicateShare)
	if _, err := CombineShares([]*Share{shares[0], nil, shares[2]}, nil); err == nil {
		t.Fatal("nil share accepted")
	}
}

func TestOpenShareWrongIdentity(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	stranger, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	for _, ids := range [][]age.Identity{{c.identities[1]}, {stranger}, {stranger, c.identities[2]}} {
		s, err := OpenShare(c.sealed[0].Ciphertext, ids...)
		var nm *age.NoIdentityMatchError
		if s != nil || !errors.Is(err, ErrShareDecrypt) || !errors.As(err, &nm) {
			t.Fatalf("err = %v, want ErrShareDecrypt wrapping *age.NoIdentityMatchError", err)
		}
	}
	if _, err := OpenShare(c.sealed[0].Ciphertext); !errors.Is(err, ErrShareDecrypt) {
		t.Fatalf("no identity: err = %v", err)
	}
	if _, err := OpenShare(make([]byte, MaxSealedShareSize+1), stranger); !errors.Is(err, ErrShareDecrypt) {
		t.Fatalf("oversized: err = %v", err)
	}
}

func TestParseRecipient(t *testing.T) {
	x, _ := age.GenerateX25519Identity()
	h, _ := age.GenerateHybridIdentity()
	for _, good := range []string{x.Recipient().String(), h.Recipient().String()} {
		r, err := ParseRecipient(good)
		if err != nil || fmt.Sprint(r) != good {
			t.Errorf("ParseRecipient(%q) = %v, %v", good, r, err)
		}
	}
	for _, bad := range []string{
		"",
		"correct horse battery staple",
		"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN alice@example",
		"age1yubikey1qwt50d05nh5vutpdzmlg5wn80xq5negm4uj9ghv0snvdd3yysf5yw3rhl3t",
		"age1tag1qwt50d05nh5vutpdzmlg5wn80xq5negm4uj9ghv0snvdd3yysf5yw3rhl3t",
		x.String(),
		h.String(),
	} {
		_, err := ParseRecipient(bad)
		if !errors.Is(err, ErrUnsupportedRecipient) {
			t.Errorf("ParseRecipient(%.30q): err = %v, want ErrUnsupportedRecipient", bad, err)
		} else if bad != "" && strings.Contains(err.Error(), bad) {
			t.Errorf("error quotes its input: %v", err)
		}
	}
	malformed := x.Recipient().String()[:40]
	if _, err := ParseRecipient(malformed); err == nil || errors.Is(err, ErrUnsupportedRecipient) {
		t.Errorf("ParseRecipient(truncated): err = %v, want a malformed-recipient error", err)
	}
	c := []Custodian{{"alice", x.Recipient().String()}, {"bob", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW"}}
	_, _, err := SplitSecret(make([]byte, 32), SplitParams{CeremonyID: "c", Threshold: 2, Custodians: c})
	if !errors.Is(err, ErrSplitParams) || !errors.Is(err, ErrUnsupportedRecipient) || !strings.Contains(err.Error(), `custodians[1].recipient ("bob")`) {
		t.Fatalf("SplitSecret with an SSH recipient: err = %v", err)
	}
}

func TestSplitParamsRefused(t *testing.T) {
	x1, _ := age.GenerateX25519Identity()
	x2, _ := age.GenerateX25519Identity()
	two := []Custodian{{"alice", x1.Recipient().String()}, {"bob", x2.Recipient().String()}}
	for _, tc := range []struct {
		name   string
		secret []byte
		p      SplitParams
	}{
		{"short secret", make([]byte, MinSecretSize-1), SplitParams{CeremonyID: "c", Threshold: 2, Custodians: two}},
		{"long secret", make([]byte, MaxSecretSize+1), SplitParams{CeremonyID: "c", Threshold: 2, Custodians: two}},
		{"no ceremony ID", make([]byte, 32), SplitParams{Threshold: 2, Custodians: two}},
		{"control in label", make([]byte, 32), SplitParams{CeremonyID: "c", Label: "a\nb", Threshold: 2, Custodians: two}},
		{"one custodian", make([]byte, 32), SplitParams{CeremonyID: "c", Threshold: 2, Custodians: two[:1]}},
		{"threshold 1", make([]byte, 32), SplitParams{CeremonyID: "c", Threshold: 1, Custodians: two}},
		{"threshold above n", make([]byte, 32), SplitParams{CeremonyID: "c", Threshold: 3, Custodians: two}},
		{"same name", make([]byte, 32), SplitParams{CeremonyID: "c", Threshold: 2, Custodians: []Custodian{two[0], {"alice", two[1].Recipient}}}},
		{"same recipient", make([]byte, 32), SplitParams{CeremonyID: "c", Threshold: 2, Custodians: []Custodian{two[0], {"bob", two[0].Recipient}}}},
	} {
		if _, _, err := SplitSecret(tc.secret, tc.p); !errors.Is(err, ErrSplitParams) {
			t.Errorf("%s: err = %v, want ErrSplitParams", tc.name, err)
		}
	}
	errBroken := errors.New("broken reader")
	p := SplitParams{CeremonyID: "c", Threshold: 2, Custodians: two, Rand: shamirFailReader{errBroken}}
	if _, _, err := SplitSecret(make([]byte, 32), p); !errors.Is(err, errBroken) {
		t.Errorf("failing Rand: err = %v", err)
	}
}

func TestShareRedacted(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	s := c.open(t)[0]
	data := s.Data
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%d", "%x", "%q"} {
		for _, arg := range []any{s, *s} {
			out := fmt.Sprintf(verb, arg)
			if !strings.Contains(out, "REDACTED") || strings.Contains(out, hex.EncodeToString(data[:8])) ||
				strings.Contains(out, base64.StdEncoding.EncodeToString(data[:9])) || strings.Contains(out, fmt.Sprint(data[:4])) {
				t.Fatalf("%s prints %s", verb, out)
			}
		}
	}
	s.Clear()
	if !bytes.Equal(data, make([]byte, len(data))) {
		t.Fatal("Clear left data")
	}
}

func TestShareParseStrict(t *testing.T) {
	c := newShareTestCeremony(t, "root-init")
	s := c.open(t)[0]
	canon, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := shareParse(canon); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.Unmarshal(canon, &m)
	m["extra"] = 1
	extra, _ := json.Marshal(m)
	for name, pt := range map[string][]byte{
		"unknown field": extra,
		"indented":      bytes.ReplaceAll(canon, []byte(`,"`), []byte(", \"")),
		"trailing":      append(bytes.Clone(canon), '\n'),
		"upper key":     bytes.Replace(canon, []byte(`"index"`), []byte(`"Index"`), 1),
		"not json":      []byte("not json"),
	} {
		if _, err := shareParse(pt); !errors.Is(err, ErrMalformedShare) {
			t.Errorf("%s: err = %v, want ErrMalformedShare", name, err)
		}
	}
}

func FuzzShareParse(f *testing.F) {
	s := &Share{Version: 1, CeremonyID: "c", Index: 1, Threshold: 2, Total: 2, Custodian: "a",
		Data: append(make([]byte, MinSecretSize), 1), SecretDigest: make([]byte, 32), CeremonyKey: make([]byte, 32), Signature: make([]byte, 64)}
	seed, _ := json.Marshal(s)
	f.Add(seed)
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, pt []byte) {
		s, err := shareParse(pt)
		if err != nil {
			return
		}
		out, err := json.Marshal(s)
		if err != nil || !bytes.Equal(out, pt) {
			t.Fatalf("parse/marshal round trip changed %q to %q", pt, out)
		}
	})
}
