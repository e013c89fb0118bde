package client

import (
	"context"
	"fmt"
	"math"
	"time"

	hsmdv1 "github.com/hsmd/hsmd/api/hsmd/v1"
)

// Key version states ([KeyVersion.State]).
const (
	// StateEnabled: the version decrypts (and, if current, encrypts).
	StateEnabled = "enabled"
	// StateDisabled: the version refuses to decrypt until enabled again.
	StateDisabled = "disabled"
	// StateDestroyScheduled: the version refuses to decrypt and is
	// destroyed at its DestroyTime unless the destruction is cancelled.
	StateDestroyScheduled = "destroy_scheduled"
	// StateDestroyed: the version's key material is gone for good.
	StateDestroyed = "destroyed"
)

// Key is the state of a tenant's key: its versions and rotation policy.
// It holds no key material.
//
// The methods that manage keys return the tenant's Key as it is after the
// change. Their errors are gRPC status errors from the server:
// codes.NotFound for an unknown tenant or version; codes.FailedPrecondition
// for a change the version's state does not allow (disabling or destroying
// the current version, enabling a destroyed one); codes.InvalidArgument for
// a policy or waiting period out of the server's range. A malformed
// response is an "hsmd client: " error.
type Key struct {
	Tenant string
	// CurrentVersion is the version new encryptions use.
	CurrentVersion uint32
	Versions       []KeyVersion
	Policy         Policy
	// NextRotation is when the next automatic rotation happens; the zero
	// time if none is scheduled.
	NextRotation time.Time
}

// Policy is a tenant's key policy.
type Policy struct {
	// RotationPeriod is how often a new version is made current
	// automatically: 0 for never; else at least an hour, in whole seconds.
	RotationPeriod time.Duration
	// MinDecryptionVersion: versions below it refuse to decrypt (their
	// items fail with [ErrKeyRetired]). 0 or 1: none do.
	MinDecryptionVersion uint32
	// MaxDEKsPerVersion: the current version rotates early once it has
	// derived this many data keys to encrypt (0: no limit).
	MaxDEKsPerVersion uint64
}

// RotateKey makes a new key version current; older versions keep
// decrypting. Errors are described at [Key].
func (c *Client) RotateKey(ctx context.Context, tenant string) (Key, error) {
	return keyResult(c.keys.RotateKey(ctx, &hsmdv1.RotateKeyRequest{Tenant: tenant}))
}

// GetKey returns the tenant's key; codes.NotFound if the tenant is
// unknown.
func (c *Client) GetKey(ctx context.Context, tenant string) (Key, error) {
	return keyResult(c.keys.GetKey(ctx, &hsmdv1.GetKeyRequest{Tenant: tenant}))
}

// SetKeyPolicy replaces the tenant's key policy as a whole: read it with
// [Client.GetKey] first to change one field. p.RotationPeriod must be 0 or
// a positive whole number of seconds, or SetKeyPolicy fails with an
// "hsmd client: " error without calling the server; other errors are
// described at [Key].
func (c *Client) SetKeyPolicy(ctx context.Context, tenant string, p Policy) (Key, error) {
	secs, err := wholeSeconds("rotation period", p.RotationPeriod)
	if err != nil {
		return Key{}, err
	}
	return keyResult(c.keys.SetKeyPolicy(ctx, &hsmdv1.SetKeyPolicyRequest{
		Tenant: tenant,
		Policy: &hsmdv1.KeyPolicy{RotationPeriodSeconds: secs, MinDecryptionVersion: p.MinDecryptionVersion, MaxDeksPerVersion: p.MaxDEKsPerVersion},
	}))
}

// DisableVersion makes a version other than the current one refuse to
// decrypt (its items fail with [ErrKeyDisabled]) until it is enabled again.
// Errors are described at [Key].
func (c *Client) DisableVersion(ctx context.Context, tenant string, v uint32) (Key, error) {
	return keyResult(c.keys.DisableVersion(ctx, &hsmdv1.VersionRequest{Tenant: tenant, Version: v}))
}

// EnableVersion undoes [Client.DisableVersion]. Errors are described at
// [Key].
func (c *Client) EnableVersion(ctx context.Context, tenant string, v uint32) (Key, error) {
	return keyResult(c.keys.EnableVersion(ctx, &hsmdv1.VersionRequest{Tenant: tenant, Version: v}))
}

// ScheduleDestroy schedules the destruction of a version other than the
// current one after wait; 0 means the server's default (7 days). Until
// then the version refuses to decrypt ([ErrKeyDisabled]) and
// [Client.CancelDestroy] can return it to disabled; afterwards nothing it
// encrypted can be decrypted. wait must be 0 or a positive whole number of
// seconds, or ScheduleDestroy fails with an "hsmd client: " error without
// calling the server; other errors are described at [Key].
func (c *Client) ScheduleDestroy(ctx context.Context, tenant string, v uint32, wait time.Duration, opts ...CallOption) (Key, error) {
	secs, err := wholeSeconds("destruction wait", wait)
	if err != nil {
		return Key{}, err
	}
	o := callOptions(opts)
	return keyResult(c.keys.ScheduleDestroy(ctx, &hsmdv1.ScheduleDestroyRequest{Tenant: tenant, Version: v, WaitSeconds: secs, Approval: o.approval}))
}

// CancelDestroy cancels a scheduled destruction, leaving the version
// disabled. Errors are described at [Key].
func (c *Client) CancelDestroy(ctx context.Context, tenant string, v uint32) (Key, error) {
	return keyResult(c.keys.CancelDestroy(ctx, &hsmdv1.VersionRequest{Tenant: tenant, Version: v}))
}

// wholeSeconds converts a non-negative duration of whole seconds.
func wholeSeconds(name string, d time.Duration) (int64, error) {
	if d < 0 || d%time.Second != 0 {
		return 0, fmt.Errorf("hsmd client: %s %v: want 0 or a positive whole number of seconds", name, d)
	}
	return int64(d / time.Second), nil
}

func keyResult(k *hsmdv1.Key, err error) (Key, error) {
	if err != nil {
		return Key{}, err
	}
	return keyFromProto(k)
}

// maxPeriodSeconds is the longest rotation period a time.Duration holds.
const maxPeriodSeconds = math.MaxInt64 / int64(time.Second)

func keyFromProto(k *hsmdv1.Key) (Key, error) {
	secs := k.GetPolicy().GetRotationPeriodSeconds()
	if secs < 0 || secs > maxPeriodSeconds {
		return Key{}, fmt.Errorf("hsmd client: server returned an out-of-range rotation period (%d s)", secs)
	}
	out := Key{
		Tenant:         k.GetTenant(),
		CurrentVersion: k.GetCurrentVersion(),
		Policy: Policy{
			RotationPeriod:       time.Duration(secs) * time.Second,
			MinDecryptionVersion: k.GetPolicy().GetMinDecryptionVersion(),
			MaxDEKsPerVersion:    k.GetPolicy().GetMaxDeksPerVersion(),
		},
		NextRotation: unixTime(k.GetNextRotationTime()),
	}
	for _, v := range k.GetVersions() {
		out.Versions = append(out.Versions, keyVersionFromProto(v))
	}
	return out, nil
}
