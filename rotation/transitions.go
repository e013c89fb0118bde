// Package rotation holds the life cycle of a tenant's key versions: the pure
// transitions between their states (this file), a Manager that applies one
// transition to one tenant in the store with compare-and-swap retries, and a
// Scheduler that rotates due tenants and destroys due versions in the
// daemon.
//
// Rotation is metadata only (docs: DESIGN.md, "Key hierarchy"): a new key
// version is a new random salt in the tenant's record, and a version's data
// keys are derived from it inside the HSM only when used. Nothing in this
// package touches the HSM or the TPM.
//
// # States
//
//	enabled ──Disable──▶ disabled ──Enable──▶ enabled
//	enabled, disabled ──ScheduleDestroy──▶ destroy_scheduled
//	destroy_scheduled ──CancelDestroy──▶ disabled
//	destroy_scheduled ──DestroyDue, at DestroyTime──▶ destroyed (final)
//
// The current version (the one new encryptions use) is always enabled: it
// cannot be disabled or scheduled for destruction; rotate first.
//
// # Erasure
//
// Destroying a version zeroes its salt in place and drops it from the
// record; the store then rewrites the record. This is best effort as far as
// memory goes (copies held elsewhere, by the garbage collector or in the
// store's freed pages, are not reached), and backups of the store still hold
// the salt: see docs/KEYS.md.
package rotation

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hsmd/hsmd/store"
)

// Defaults. The daemon's configuration falls back on these.
const (
	// DefaultRotationPeriod is the rotation period of a new tenant's policy.
	DefaultRotationPeriod = 90 * 24 * time.Hour
	// DefaultDestroyWait is the time between ScheduleDestroy and the
	// destruction when the caller names none.
	DefaultDestroyWait = 7 * 24 * time.Hour
	// MinDestroyWait is the shortest destruction waiting period accepted
	// outside the development profile.
	MinDestroyWait = 24 * time.Hour
	// MinRotationPeriod is the shortest non-zero rotation period.
	MinRotationPeriod = time.Hour
)

// Errors of the transitions. Every refusal wraps exactly one of them; test
// with errors.Is.
var (
	// ErrTransition: the operation is not allowed from the version's
	// state; the message names both states.
	ErrTransition = errors.New("rotation: transition not allowed")
	// ErrNoVersion: the tenant has no such key version.
	ErrNoVersion = errors.New("rotation: no such key version")
	// ErrCurrent: the current version cannot be disabled or scheduled for
	// destruction; rotate first.
	ErrCurrent = errors.New("rotation: the current version cannot be retired; rotate first")
	// ErrWaitTooShort: the destruction waiting period is below the minimum.
	ErrWaitTooShort = errors.New("rotation: destruction waiting period too short")
	// ErrPolicy: the key policy is invalid; the message names the field.
	ErrPolicy = errors.New("rotation: invalid policy")
)

// Errors of CanDecrypt.
var (
	// ErrDisabled: the version is disabled or scheduled for destruction.
	ErrDisabled = errors.New("rotation: key version is disabled")
	// ErrDestroyed: the version is destroyed; what it sealed is lost.
	ErrDestroyed = errors.New("rotation: key version is destroyed")
	// ErrBelowMinVersion: the version is below the policy's
	// min_decryption_version.
	ErrBelowMinVersion = errors.New("rotation: key version is below min_decryption_version")
)

// index returns the position of version v in t.Versions, or ErrNoVersion.
func index(t *store.Tenant, v uint32) (int, error) {
	for i := range t.Versions {
		if t.Versions[i].Version == v {
			return i, nil
		}
	}
	return -1, fmt.Errorf("%w: tenant %q has no version %d", ErrNoVersion, t.Name, v)
}

// transition moves version v of t from one of the states in from to state
// to, refusing the current version if retire is set. It changes nothing on
// error.
func transition(t *store.Tenant, v uint32, retire bool, to store.KeyState, from ...store.KeyState) (*store.KeyVersion, error) {
	i, err := index(t, v)
	if err != nil {
		return nil, err
	}
	if retire && v == t.Current {
		return nil, fmt.Errorf("%w: tenant %q version %d is current", ErrCurrent, t.Name, v)
	}
	kv := &t.Versions[i]
	for _, s := range from {
		if kv.State == s {
			kv.State = to
			return kv, nil
		}
	}
	return nil, fmt.Errorf("%w: tenant %q version %d: %s → %s", ErrTransition, t.Name, v, kv.State, to)
}

// Rotate appends a new enabled key version to t, numbered one above the
// highest existing version, with a fresh SaltSize-byte salt read from rand,
// the given kdk version and CreateTime now, and makes it current. The
// previous versions are untouched (they keep decrypting). It returns the
// new version.
//
// It returns an error, and changes nothing, if kdkVersion is 0, if version
// numbers are exhausted (ErrTransition), or if rand fails or yields an
// all-zero salt. Not safe for concurrent use on the same t.
func Rotate(t *store.Tenant, kdkVersion uint32, now time.Time, rand io.Reader) (uint32, error) {
	if kdkVersion == 0 {
		return 0, fmt.Errorf("rotation: rotate tenant %q: kdk version 0", t.Name)
	}
	var next uint32 = 1
	for _, kv := range t.Versions {
		if kv.Version >= next {
			next = kv.Version + 1
		}
	}
	if next == 0 {
		return 0, fmt.Errorf("%w: tenant %q: key version numbers exhausted", ErrTransition, t.Name)
	}
	salt := make([]byte, store.SaltSize)
	if _, err := io.ReadFull(rand, salt); err != nil {
		return 0, fmt.Errorf("rotation: rotate tenant %q: reading a salt: %w", t.Name, err)
	}
	if allZero(salt) {
		return 0, fmt.Errorf("rotation: rotate tenant %q: the random source returned zeros", t.Name)
	}
	t.Versions = append(t.Versions, store.KeyVersion{
		Version:    next,
		KDKVersion: kdkVersion,
		State:      store.StateEnabled,
		Salt:       salt,
		CreateTime: now,
	})
	t.Current = next
	return next, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Disable moves version v from enabled to disabled. It returns ErrNoVersion,
// ErrCurrent if v is current, or ErrTransition; it changes nothing on error.
func Disable(t *store.Tenant, v uint32) error {
	_, err := transition(t, v, true, store.StateDisabled, store.StateEnabled)
	return err
}

// Enable moves version v from disabled to enabled. It returns ErrNoVersion or
// ErrTransition (destroy_scheduled must be cancelled first, to disabled); it
// changes nothing on error.
func Enable(t *store.Tenant, v uint32) error {
	_, err := transition(t, v, false, store.StateEnabled, store.StateDisabled)
	return err
}

// ScheduleDestroy moves version v from enabled or disabled to
// destroy_scheduled, to be destroyed at now+wait. It returns ErrWaitTooShort
// if wait < minWait or wait < 0, ErrNoVersion, ErrCurrent if v is current, or
// ErrTransition; it changes nothing on error.
func ScheduleDestroy(t *store.Tenant, v uint32, now time.Time, wait, minWait time.Duration) error {
	if wait < minWait || wait < 0 {
		return fmt.Errorf("%w: %s, the minimum is %s", ErrWaitTooShort, wait, max(minWait, 0))
	}
	kv, err := transition(t, v, true, store.StateDestroyScheduled, store.StateEnabled, store.StateDisabled)
	if err != nil {
		return err
	}
	kv.DestroyTime = now.Add(wait)
	return nil
}

// CancelDestroy moves version v from destroy_scheduled to disabled and
// clears its DestroyTime. It returns ErrNoVersion or ErrTransition; it
// changes nothing on error.
func CancelDestroy(t *store.Tenant, v uint32) error {
	kv, err := transition(t, v, false, store.StateDisabled, store.StateDestroyScheduled)
	if err != nil {
		return err
	}
	kv.DestroyTime = time.Time{}
	return nil
}

// DestroyDue destroys every destroy_scheduled version of t whose DestroyTime
// is at or before now: its salt is zeroed in place (so every slice sharing
// it sees zeros), then set to nil; its DestroyTime is kept and records when
// the destruction was due. It returns the versions destroyed, in order, or
// nil. It cannot fail.
func DestroyDue(t *store.Tenant, now time.Time) []uint32 {
	var out []uint32
	for i := range t.Versions {
		kv := &t.Versions[i]
		if kv.State != store.StateDestroyScheduled || kv.DestroyTime.After(now) {
			continue
		}
		clear(kv.Salt)
		kv.Salt = nil
		clear(kv.XWingSealed) // the sealed X-Wing private key goes with the salt
		kv.XWingSealed = nil
		kv.State = store.StateDestroyed
		out = append(out, kv.Version)
	}
	return out
}

// SetPolicy replaces t's policy with p. It returns ErrPolicy, naming the
// field, if p.RotationPeriod is negative or between 0 and MinRotationPeriod
// (exclusive), or if p.MinDecryptionVersion is above t.Current; it changes
// nothing on error.
func SetPolicy(t *store.Tenant, p store.Policy) error {
	if p.RotationPeriod < 0 || (p.RotationPeriod > 0 && p.RotationPeriod < MinRotationPeriod) {
		return fmt.Errorf("%w: rotation_period %s: must be 0 (never) or at least %s",
			ErrPolicy, p.RotationPeriod, MinRotationPeriod)
	}
	if p.MinDecryptionVersion > t.Current {
		return fmt.Errorf("%w: min_decryption_version %d is above the current version %d",
			ErrPolicy, p.MinDecryptionVersion, t.Current)
	}
	if p.MaxDEKsPerVersion != 0 && p.MaxDEKsPerVersion < MinMaxDEKsPerVersion {
		return fmt.Errorf("%w: max_deks_per_version %d: must be 0 (no limit) or at least %d",
			ErrPolicy, p.MaxDEKsPerVersion, MinMaxDEKsPerVersion)
	}
	t.Policy = p
	return nil
}

// CanDecrypt returns nil if version v of t may decrypt: it exists, is
// enabled and is at least the policy's MinDecryptionVersion. Otherwise it
// returns, checked in this order, ErrNoVersion, ErrDestroyed,
// ErrBelowMinVersion, or ErrDisabled (disabled or destroy_scheduled).
func CanDecrypt(t *store.Tenant, v uint32) error {
	i, err := index(t, v)
	if err != nil {
		return err
	}
	switch kv := t.Versions[i]; {
	case kv.State == store.StateDestroyed:
		return fmt.Errorf("%w: tenant %q version %d", ErrDestroyed, t.Name, v)
	case v < t.Policy.MinDecryptionVersion:
		return fmt.Errorf("%w: tenant %q version %d, minimum %d", ErrBelowMinVersion, t.Name, v, t.Policy.MinDecryptionVersion)
	case kv.State != store.StateEnabled:
		return fmt.Errorf("%w: tenant %q version %d is %s", ErrDisabled, t.Name, v, kv.State)
	}
	return nil
}

// NextRotation returns when t's current version becomes due for automatic
// rotation (its CreateTime plus the rotation period), or false if the policy
// never rotates or t has no current version.
func NextRotation(t *store.Tenant) (time.Time, bool) {
	if t.Policy.RotationPeriod <= 0 {
		return time.Time{}, false
	}
	kv, ok := t.Version(t.Current)
	if !ok {
		return time.Time{}, false
	}
	return kv.CreateTime.Add(t.Policy.RotationPeriod), true
}

// Due reports whether t is due for automatic rotation at now: its policy has
// a rotation period and its current version is at least that old.
func Due(t *store.Tenant, now time.Time) bool {
	next, ok := NextRotation(t)
	return ok && !next.After(now)
}
