package hsm

import (
	"errors"

	"github.com/miekg/pkcs11"
)

// Class says what a caller can do about an error.
type Class int

const (
	// ClassPermanent errors are about the request or the key (bad
	// arguments, a bad tag, a missing key): retrying will not help.
	ClassPermanent Class = iota
	// ClassRetryable errors are transient: the pool was busy, a call hit its
	// deadline, or a session was lost (and has been replaced). Retry later.
	ClassRetryable
	// ClassFatal errors mean the token is unusable (removed, PIN locked or
	// expired, login lost, or the key handles loaded by LoadKeys gone
	// because the token was re-initialised or restored under us): Ready
	// fails at once and every operation fails fast. If the cause may pass
	// (the token was removed, its PIN expired, its handles went stale) the
	// HSM recovers by itself in the background (see the package doc,
	// "Recovery"); otherwise (wrong or locked PIN, unreadable PIN source)
	// it stays unusable until an operator acts and the HSM is reopened.
	ClassFatal
)

func (c Class) String() string {
	switch c {
	case ClassRetryable:
		return "retryable"
	case ClassFatal:
		return "fatal"
	default:
		return "permanent"
	}
}

// Class sentinels: errors.Is(err, ErrRetryable) is true for every error of
// class ClassRetryable, whatever its other sentinels, and likewise ErrFatal.
var (
	ErrRetryable error = &classError{"hsm: retryable error", ClassRetryable}
	ErrFatal     error = &classError{"hsm: fatal error", ClassFatal}
)

// Sentinels. Errors returned by this package wrap at least one of them or a
// *Error; test with errors.Is.
var (
	// ErrBusy: no session became free before the deadline. Retryable.
	ErrBusy error = &classError{"hsm: session pool busy", ClassRetryable}
	// ErrTimeout: an HSM call did not finish before its deadline. The call
	// may still complete inside the HSM; its session is then returned to the
	// pool. Retryable.
	ErrTimeout error = &classError{"hsm: call timed out", ClassRetryable}
	// ErrClosed: the HSM has been closed.
	ErrClosed = errors.New("hsm: closed")
	// ErrLogin: the user login failed (wrong PIN, locked PIN, unreadable PIN
	// source). The message never contains the PIN.
	ErrLogin = errors.New("hsm: login failed")
	// ErrTokenNotFound: no token with the configured label is present.
	ErrTokenNotFound = errors.New("hsm: token not found")
	// ErrKeyNotFound: a key is missing on the token (or LoadKeys was not
	// called). The wrapping message names the label.
	ErrKeyNotFound = errors.New("hsm: key not found")
	// ErrKeysExist: InitKeys found hsmd keys on the token and created nothing.
	ErrKeysExist = errors.New("hsm: hsmd keys already exist on the token")
	// ErrKeyExists: ImportRoots or CreateRoots found an object with a label
	// it was to create, and created nothing. The wrapping message names the
	// labels.
	ErrKeyExists = errors.New("hsm: key already exists")
	// ErrLastVersion: DestroyRoot refused to destroy the only remaining
	// version of a key kind.
	ErrLastVersion = errors.New("hsm: refusing to destroy the last version of a key")
	// ErrInvalidMaterial: root material is malformed (wrong size, unknown
	// format version, invalid P-256 scalar). The message never holds key
	// bytes.
	ErrInvalidMaterial = errors.New("hsm: invalid root material")
	// ErrWrapOpen: WrapOpen failed. Authentication failures return exactly
	// this error, with no detail.
	ErrWrapOpen = errors.New("hsm: cannot open wrapped data")
	// ErrInvalidConfig: Config.Validate failed.
	ErrInvalidConfig = errors.New("hsm: invalid config")
)

type classError struct {
	msg   string
	class Class
}

func (e *classError) Error() string { return e.msg }

func (e *classError) Is(target error) bool {
	return (target == ErrRetryable && e.class == ClassRetryable) ||
		(target == ErrFatal && e.class == ClassFatal)
}

// Error is a classified failure of one PKCS#11 operation. Err is usually a
// pkcs11.Error (errors.As works through it). It never holds PINs or key
// bytes.
type Error struct {
	Op    string // the hsm operation, e.g. "prf", "login"
	Class Class
	Err   error
}

func (e *Error) Error() string { return "hsm: " + e.Op + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is the class sentinel matching e.Class.
func (e *Error) Is(target error) bool {
	return (target == ErrRetryable && e.Class == ClassRetryable) ||
		(target == ErrFatal && e.Class == ClassFatal)
}

// IsRetryable reports whether err is transient: the same call may succeed
// if repeated later (pool busy, deadline hit, session lost and replaced).
func IsRetryable(err error) bool { return errors.Is(err, ErrRetryable) }

// IsFatal reports whether err means the token is unusable: until the HSM
// recovers by itself, or, for a PIN failure, until it is reopened.
func IsFatal(err error) bool { return errors.Is(err, ErrFatal) }

// classify maps a PKCS#11 return value to a Class. Session-level failures
// are retryable (the pool replaces the session); token and PIN failures are
// fatal; everything else is about the request. An invalid key or object
// handle is fatal: operations only use handles LoadKeys (or a search in the
// same call) just found, so it means the token's objects were replaced
// under us and every cached handle is stale. CKR_GENERAL_ERROR stays
// permanent: SoftHSM returns it for a bad AES-GCM tag.
func classify(rv pkcs11.Error) Class {
	switch uint(rv) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_MEMORY,
		pkcs11.CKR_FUNCTION_FAILED, pkcs11.CKR_OPERATION_ACTIVE,
		pkcs11.CKR_SESSION_COUNT, pkcs11.CKR_HOST_MEMORY:
		return ClassRetryable
	case pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_PIN_EXPIRED,
		pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LEN_RANGE,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_OBJECT_HANDLE_INVALID:
		return ClassFatal
	}
	return ClassPermanent
}

// replacesSession reports whether rv means the session itself is bad (or
// in an unknown state) and must not be reused.
func replacesSession(rv pkcs11.Error) bool {
	switch uint(rv) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_MEMORY,
		pkcs11.CKR_FUNCTION_FAILED, pkcs11.CKR_OPERATION_ACTIVE:
		return true
	}
	return false
}

// wrapErr turns a PKCS#11 error from a Module call into a classified
// *Error. Other errors pass through unchanged.
func wrapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	var he *Error
	if errors.As(err, &he) || errors.Is(err, ErrRetryable) || errors.Is(err, ErrFatal) {
		return err
	}
	var rv pkcs11.Error
	if errors.As(err, &rv) {
		return &Error{Op: op, Class: classify(rv), Err: err}
	}
	return err // this package's own errors are prefixed and permanent
}

// recoverable reports whether the fatal error err may pass without an
// operator, so that the HSM may reopen its sessions, log in again and
// reload its keys by itself: the token was removed or not recognised, the
// module lost its state, the PIN expired (an operator changes it and the
// PIN file), the loaded key handles went stale, or a login met a
// session-level failure. A PIN that is wrong, locked, invalid or of the
// wrong length, an unreadable PIN source, a login refused for another
// reason, and anything unknown are permanent: retrying a login could burn
// PIN attempts or cannot succeed without an operator.
func recoverable(err error) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	switch uint(rv) {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_LOCKED, pkcs11.CKR_PIN_LEN_RANGE,
		pkcs11.CKR_PIN_INVALID:
		return false
	}
	return classify(rv) != ClassPermanent
}
