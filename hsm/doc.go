// Package hsm gives hsmd its root keys in a PKCS#11 token (SoftHSM2 in
// development, a real HSM in production) through github.com/miekg/pkcs11.
//
// # Keys
//
// InitKeys creates, on an empty token, hsmd/kdk/v1 (HMAC-SHA256 generic
// secret: the PRF behind every data key), hsmd/wrap/v1 (AES-256 for AES-GCM),
// hsmd/sig-p256/v1 and hsmd/sig-ed25519/v1 (signing key pairs). All secret
// and private keys are generated in the token with CKA_TOKEN, CKA_PRIVATE,
// CKA_SENSITIVE true and CKA_EXTRACTABLE, CKA_MODIFIABLE and CKA_COPYABLE
// false, so they never leave it and cannot be changed or cloned.
// LoadKeys looks them up once by label; PRF, WrapSeal/WrapOpen and Signer use
// them.
//
// # Key versions and ceremonies
//
// Each kind may have several versions, hsmd/<kind>/vN. CreateRoots
// generates a version inside the HSM (no backup); ImportRoots creates one
// from RootMaterial drawn outside it (NewRootMaterial, Marshal and
// ParseRootMaterial let a ceremony split it among custodians and restore
// it onto another token), with the same attributes. Both refuse an
// existing label and check every new key (against the material's known
// answers when imported) before returning; on failure they destroy what
// they made. DestroyRoot removes a version but never the last one of a
// kind; RootVersions lists what the token holds. These changes are
// serialised within the process and update the loaded keys at once:
// NewestKDK, Signer and WrapSeal use the newest version of their kind, PRF
// and SignerVersion the version asked for, and WrapOpen the version named
// in the sealed blob (hsmd/wrap/v1 for blobs without one). Erasure of
// RootMaterial is best effort.
//
// # Concurrency and deadlines
//
// An HSM is safe for concurrent use. It keeps a fixed pool of
// Config.Sessions sessions; each operation holds one for its duration.
// Waiting for a session and running the operation are bounded by the
// caller's context and Config.CallTimeout. A PKCS#11 call cannot be
// cancelled, so at the deadline the caller gets a retryable ErrTimeout while
// the call completes in the background; its session returns to the pool
// only afterwards, so a session is never used by two operations at once.
//
// # Errors
//
// Errors are prefixed "hsm: " and classified (see Class, IsRetryable,
// IsFatal). A session-level failure (session handle invalid or closed,
// device error or out of memory, function failed, operation active) is
// retryable: the failing call returns the error (there is no internal retry,
// so callers keep control of their deadline) and the pool replaces the
// session. A token or PIN failure (token removed, not present or not
// recognised, module not initialized, PIN incorrect, locked, of the wrong
// length or expired) is fatal, and so is an invalid key or object handle
// (the token was re-initialised or restored, so the loaded handles are
// stale): Ready fails at once and every later operation fails fast, without
// reaching the module, until the HSM recovers (see Recovery) or, for a
// permanent cause, for good. On CKR_USER_NOT_LOGGED_IN the HSM logs in
// again, re-reading the PIN file (the error is then retryable); however many
// sessions see the loss, one login attempt is made for it. If that attempt
// fails, the error is fatal (permanent if the PIN was refused), and no
// further login is tried for it. Errors never contain PINs or key bytes.
//
// # Recovery
//
// Fatal errors are recoverable or permanent. Permanent: a PIN that is
// incorrect, locked, invalid or of the wrong length, a login refused for
// another reason, an unreadable PIN source, and any fatal error when the
// PIN came from a descriptor (Config.PINFD), which cannot be read again:
// retrying a login could burn PIN attempts or cannot succeed without an
// operator, so the HSM never logs in again and must be closed and
// reopened. Recoverable: everything else (token removed, not present or
// not recognised, the module's state lost, the PIN expired, stale
// handles).
//
// On a recoverable error one background goroutine takes every pooled
// session (waiting for calls in flight to return theirs; new calls fail
// fast meanwhile, and calls waiting for a session give up at once), closes
// them, and after Config.RecoveryHoldDown (1s by default, at least 1s) from
// the error makes an attempt, then more with a delay doubling from the
// hold-down up to Config.RecoveryMaxBackoff (30s by default). An attempt
// finds the token by its label and the serial number seen at Open (a
// token with the label and another serial number is refused), initializes
// the module again if it lost its state (never finalizing it: other HSMs
// may use it), opens Config.Sessions sessions, reads the PIN again from its
// file or source and logs in, and finds every loaded key again by its
// label, checking it is the same key: a signing pair by its public key and
// a signature verifying under the public key loaded, a secret key by an
// answer recorded at load (the HMAC of a fixed message under a kdk, a
// ciphertext sealed under a wrap key opening to its fixed plaintext).
// Only when all of this succeeds are the new sessions and handles swapped
// in and the fatal state cleared; otherwise the attempt closes what it
// opened. A PIN failure during an attempt (at most one login per attempt;
// none while the token reports its PIN locked, to be changed, or at its
// final try) makes the error permanent. Handles never cross a recovery: an
// operation that picked a key handle before it fails with a retryable
// error instead of using it. Each outage, attempt and recovery is logged
// on Config.Logger (the error, its class, the attempt number, the time
// down; never a PIN); Recoveries returns the figures for metrics.
//
// # Readiness
//
// Ready checks the token state (the same token, its user PIN neither
// locked nor to be changed) and computes a test HMAC with the kdk. A
// success is reused for about a second and a failure for 100 ms, and at
// most one probe is in flight, so that frequent probes against a hung
// module neither pile up goroutines nor reach the module again. While the
// HSM is fatal Ready fails at once; after a recovery it probes afresh.
//
// # PINs
//
// The user PIN is read once from Config.PINFile, Config.PINFD or
// Config.PINSource (the daemon's TPM-sealed PIN) (at most
// MaxPINSize bytes, one trailing newline trimmed) and cleared from memory
// after login. Erasure is best effort: the PKCS#11 binding and module copy
// the PIN into C memory that this package cannot clear. Config prints the
// PIN source, never the PIN; a module path or label holding "pin-value=" is
// refused.
//
// # Modules
//
// A PKCS#11 module has one state per process. HSMs (and LoadModule users
// such as package softhsm) on the same module file share one initialized
// copy, reference counted: the last Close finalizes it. Login state is per
// token and process, so a second HSM on a token that is already logged in
// is checked against a keyed fingerprint of the first HSM's PIN.
package hsm
