package wycheproof

// Group is a test group type of one vector schema.
type Group interface {
	AEADGroup | MACGroup | HKDFGroup | ECDSAGroup | EdDSAGroup | MLDSAVerifyGroup | MLKEMGroup
	cases() []Case
}

func casesOf[T any](tests []T, c func(*T) Case) []Case {
	out := make([]Case, len(tests))
	for i := range tests {
		out[i] = c(&tests[i])
	}
	return out
}

// AEADGroup is a group of aead_test_schema_v1 (aes_gcm_test.json). Sizes
// are in bits.
type AEADGroup struct {
	Type    string     `json:"type"`
	KeySize int        `json:"keySize"`
	IVSize  int        `json:"ivSize"`
	TagSize int        `json:"tagSize"`
	Tests   []AEADTest `json:"tests"`
}

// AEADTest is one AEAD vector: CT || Tag is the sealed Msg.
type AEADTest struct {
	Case
	Key Hex `json:"key"`
	IV  Hex `json:"iv"`
	AAD Hex `json:"aad"`
	Msg Hex `json:"msg"`
	CT  Hex `json:"ct"`
	Tag Hex `json:"tag"`
}

func (g AEADGroup) cases() []Case { return casesOf(g.Tests, func(t *AEADTest) Case { return t.Case }) }

// MACGroup is a group of mac_test_schema_v1 (hmac_sha256_test.json). Sizes
// are in bits; TagSize below the hash size means truncated tags.
type MACGroup struct {
	Type    string    `json:"type"`
	KeySize int       `json:"keySize"`
	TagSize int       `json:"tagSize"`
	Tests   []MACTest `json:"tests"`
}

// MACTest is one MAC vector.
type MACTest struct {
	Case
	Key Hex `json:"key"`
	Msg Hex `json:"msg"`
	Tag Hex `json:"tag"`
}

func (g MACGroup) cases() []Case { return casesOf(g.Tests, func(t *MACTest) Case { return t.Case }) }

// HKDFGroup is a group of hkdf_test_schema_v1 (hkdf_sha256_test.json).
type HKDFGroup struct {
	Type    string     `json:"type"`
	KeySize int        `json:"keySize"`
	Tests   []HKDFTest `json:"tests"`
}

// HKDFTest is one HKDF vector: OKM = HKDF(IKM, Salt, Info) of Size bytes.
type HKDFTest struct {
	Case
	IKM  Hex `json:"ikm"`
	Salt Hex `json:"salt"`
	Info Hex `json:"info"`
	Size int `json:"size"`
	OKM  Hex `json:"okm"`
}

func (g HKDFGroup) cases() []Case { return casesOf(g.Tests, func(t *HKDFTest) Case { return t.Case }) }

// ECDSAGroup is a group of ecdsa_verify_schema_v1 (DER signatures) or
// ecdsa_p1363_verify_schema_v1 (r || s signatures).
type ECDSAGroup struct {
	Type         string          `json:"type"`
	PublicKey    ECPublicKey     `json:"publicKey"`
	PublicKeyDER Hex             `json:"publicKeyDer"` // SubjectPublicKeyInfo
	SHA          string          `json:"sha"`
	Tests        []SignatureTest `json:"tests"`
}

// ECPublicKey is an EC public key of a group.
type ECPublicKey struct {
	Curve        string `json:"curve"`
	KeySize      int    `json:"keySize"`
	Uncompressed Hex    `json:"uncompressed"`
}

func (g ECDSAGroup) cases() []Case {
	return casesOf(g.Tests, func(t *SignatureTest) Case { return t.Case })
}

// SignatureTest is one signature verification vector.
type SignatureTest struct {
	Case
	Msg Hex `json:"msg"`
	Sig Hex `json:"sig"`
}

// EdDSAGroup is a group of eddsa_verify_schema_v1 (ed25519_test.json).
type EdDSAGroup struct {
	Type      string `json:"type"`
	PublicKey struct {
		Curve string `json:"curve"`
		PK    Hex    `json:"pk"`
	} `json:"publicKey"`
	PublicKeyDER Hex             `json:"publicKeyDer"`
	Tests        []SignatureTest `json:"tests"`
}

func (g EdDSAGroup) cases() []Case {
	return casesOf(g.Tests, func(t *SignatureTest) Case { return t.Case })
}

// MLDSAVerifyGroup is a group of mldsa_verify_schema
// (mldsa_44_verify_test.json). PublicKey is the FIPS 204 encoding (of any
// length: some groups test wrong lengths).
type MLDSAVerifyGroup struct {
	Type         string            `json:"type"`
	PublicKey    Hex               `json:"publicKey"`
	PublicKeyDER Hex               `json:"publicKeyDer"`
	Tests        []MLDSAVerifyTest `json:"tests"`
}

// MLDSAVerifyTest is one ML-DSA verification vector. Ctx is nil when the
// vector has no context (the empty context).
type MLDSAVerifyTest struct {
	Case
	Msg Hex `json:"msg"`
	Ctx Hex `json:"ctx"`
	Sig Hex `json:"sig"`
}

func (g MLDSAVerifyGroup) cases() []Case {
	return casesOf(g.Tests, func(t *MLDSAVerifyTest) Case { return t.Case })
}

// MLKEMGroup is a group of mlkem_test_schema (mlkem_768_test.json).
type MLKEMGroup struct {
	Type         string      `json:"type"`
	ParameterSet string      `json:"parameterSet"`
	Tests        []MLKEMTest `json:"tests"`
}

// MLKEMTest is one ML-KEM decapsulation vector: Seed is the 64-byte d || z
// decapsulation key seed, EK its encapsulation key (absent when Seed is
// malformed), K the shared secret of ciphertext C (empty when invalid).
type MLKEMTest struct {
	Case
	Seed Hex `json:"seed"`
	EK   Hex `json:"ek"`
	C    Hex `json:"c"`
	K    Hex `json:"K"`
}

func (g MLKEMGroup) cases() []Case {
	return casesOf(g.Tests, func(t *MLKEMTest) Case { return t.Case })
}
