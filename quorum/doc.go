// Package quorum gates destructive operations (shred a tenant, destroy a key
// or root version, restore roots onto a token, rotate the KDK) behind M of N
// operator approvals, in the manner of AWS CloudHSM quorum authentication.
//
// # Flow
//
// Someone describes the operation (an Operation: a kind and parameters) and
// makes a Request for it with NewRequest: a random nonce, the operation's
// digest and an expiry. The request's text is the text of a C2SP signed note
// (c2sp.org/signed-note). Each operator checks what the text says and adds a
// note signature with Approve; copies signed separately are combined with
// Merge. The service that runs the operation builds the Operation it is about
// to run, calls Policy.Verify (or Policy.Authorize, which also records the
// nonce in a Spent store), and runs the operation only if that returns no
// error.
//
// # Request text (version 1)
//
// The text is shaped as a C2SP tlog-checkpoint so that the ML-DSA-44 note
// signature of record can sign it (see Signatures):
//
//	hsmd approval request v1
//	1
//	<base64 SHA-256("hsmd quorum request v1\x00" || body)>
//	kind shred-tenant
//	param tenant billing
//	digest sha256:<64 hex digits: Operation.Digest>
//	nonce <32 hex digits: 16 random bytes>
//	created 2026-01-02T03:04:05Z
//	expires 2026-01-03T03:04:05Z
//
// body is every line after the third, newlines included. Lines 1 and 2 are
// fixed (the "origin" and a "tree size" of one entry, the request); line 3
// commits to the body, so a signature over the first three lines covers the
// whole request. param lines (zero or more) are sorted by key, keys unique.
// Times are RFC 3339 in UTC to the second. ParseRequest accepts exactly
// what Request.MarshalText produces and nothing else.
//
// # Signatures
//
// Operators hold one key each, named in the C2SP signed-note verifier key
// form "name+hash+base64(type||key)":
//
//   - Ed25519, type 0x01, made and checked by golang.org/x/mod/sumdb/note
//     over the whole text.
//   - ML-DSA-44, type 0x06: the C2SP tlog-cosignature (cosignature/v1,
//     subtree/v1) signature, made and checked by
//     github.com/transparency-dev/formats/note (NewMLDSASigner,
//     NewMLDSAVerifier). That is the only registered ML-DSA note signature
//     and it signs only a checkpoint's first three lines, so the request
//     is checkpoint-shaped and line 3 binds the rest. Its 8-byte timestamp
//     is the signer's clock, informational only.
//
// Private keys are "PRIVATE+KEY+name+hash+base64(type||key)" strings, as
// note.GenerateKey and formats' GenerateMLDSAKey write them (for ML-DSA the
// key is the 32-byte FIPS 204 seed).
//
// Operator keys must be dedicated to approvals: an Ed25519 key that also
// signs other notes, or an ML-DSA key that also witnesses logs, could be
// led to sign text of this shape.
//
// # Replay
//
// An approval is bound to one operation by the digest: presented for any
// other operation it fails with ErrWrongOperation. Presented again for the
// same operation, it passes Verify until it expires; a Spent store (such as
// FileSpent) refuses its nonce the second time with ErrReplayed, so use
// Authorize, or call Spent.Spend after Verify, before running the
// operation.
//
// # Secrets
//
// Errors never include private keys. Signers hold their keys in host memory
// for their lifetime; erasure is best effort (the Go runtime may copy).
package quorum
