// Package store keeps hsmd's metadata: tenants, their salts and their key
// versions. It holds no key material that is usable without the HSM: a
// tenant's data keys are derived inside the HSM from the root key (kdk) and
// the tenant's salt.
//
// Two backends implement Store: bbolt (package store/bolt, the embedded
// single-node default) and etcd (package store/etcd, clusters). Both must
// pass the conformance suite in package store/storetest.
package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"
)

// Errors returned by every Store implementation. Callers test with errors.Is.
var (
	// ErrNotFound: no tenant of that name or ID.
	ErrNotFound = errors.New("store: not found")
	// ErrExists: a tenant of that name (or, in theory, ID) exists.
	ErrExists = errors.New("store: already exists")
	// ErrConflict: UpdateTenant lost a race; re-read and try again.
	ErrConflict = errors.New("store: revision conflict")
	// ErrInvalid: the record fails validation; wrapped with the reason.
	ErrInvalid = errors.New("store: invalid record")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store: closed")
	// ErrUnavailable: the store cannot answer now (a clustered store
	// without quorum, or a replica cache that cannot confirm it is
	// current); retry later. A write that returns it may have been made.
	ErrUnavailable = errors.New("store: unavailable")
)

// SaltSize is the size of a key version's salt in bytes.
const SaltSize = 32

// KeyState is the state of a tenant key version (package rotation holds
// the transitions between them).
type KeyState string

// Key version states.
const (
	// StateEnabled: encrypts (if current) and decrypts.
	StateEnabled KeyState = "enabled"
	// StateDisabled: refuses to decrypt; can be enabled again.
	StateDisabled KeyState = "disabled"
	// StateDestroyScheduled: refuses to decrypt; destroyed at DestroyTime
	// unless the destruction is cancelled (back to disabled).
	StateDestroyScheduled KeyState = "destroy_scheduled"
	// StateDestroyed: the version's salt is gone; nothing it sealed can be
	// decrypted again. Final.
	StateDestroyed KeyState = "destroyed"
)

// KeyVersion is one version of a tenant's (virtual) key: its data keys are
// derived inside the HSM from the kdk, the tenant and this version's salt.
type KeyVersion struct {
	Version    uint32   `json:"version"`
	KDKVersion uint32   `json:"kdk_version"` // root key version it derives from
	State      KeyState `json:"state"`
	// Salt is SaltSize random bytes, nil once the version is destroyed:
	// not a key, but with the kdk it defines every data key of the
	// version, so erasing it is what destruction means.
	Salt       []byte    `json:"salt,omitempty"`
	CreateTime time.Time `json:"create_time"`
	// DestroyTime: when a scheduled destruction happens, or happened.
	DestroyTime time.Time `json:"destroy_time,omitzero"`
	// DEKs counts the data keys derived to encrypt under this version
	// (one per seed), for Policy.MaxDEKsPerVersion.
	DEKs uint64 `json:"deks,omitempty"`
	// XWingPublic is the version's X-Wing (MLKEM768-X25519) public key for
	// offline HPKE producers (docs/FORMAT.md, suite 0x02), nil until one is
	// made. XWingSealed is its private key sealed under the HSM wrap key
	// (never the key itself), nil once the version is destroyed.
	XWingPublic []byte `json:"xwing_public,omitempty"`
	XWingSealed []byte `json:"xwing_sealed,omitempty"`
}

// Policy is a tenant's key policy.
type Policy struct {
	// RotationPeriod: a new version is made when the current one is this
	// old (0: never automatically).
	RotationPeriod time.Duration `json:"rotation_period,omitempty"`
	// MinDecryptionVersion: versions below it refuse to decrypt (0 or 1:
	// all versions).
	MinDecryptionVersion uint32 `json:"min_decryption_version,omitempty"`
	// MaxDEKsPerVersion: once the current version has derived this many
	// data keys for encryption, it is rotated early (0: no limit).
	MaxDEKsPerVersion uint64 `json:"max_deks_per_version,omitempty"`
}

// Tenant is a tenant's metadata. Deleting it (crypto-shredding) erases
// every version's salt.
type Tenant struct {
	Name       string       `json:"name"`
	ID         uint64       `json:"id"`       // random, non-zero, unique; carried in ciphertexts
	Current    uint32       `json:"current"`  // version new encryptions use
	Versions   []KeyVersion `json:"versions"` // in version order
	Policy     Policy       `json:"policy"`
	CreateTime time.Time    `json:"create_time"`
	// Revision is set by the store on every write; UpdateTenant compares it.
	Revision uint64 `json:"-"`
}

// Version returns the key version v of t, or false.
func (t *Tenant) Version(v uint32) (KeyVersion, bool) {
	for _, kv := range t.Versions {
		if kv.Version == v {
			return kv, true
		}
	}
	return KeyVersion{}, false
}

// Clone returns a deep copy of t: a caller may change the copy (as the
// rotation manager does before UpdateTenant) without touching t.
func (t *Tenant) Clone() *Tenant {
	c := *t
	c.Versions = slices.Clone(t.Versions)
	for i := range c.Versions {
		v := &c.Versions[i]
		v.Salt, v.XWingPublic, v.XWingSealed = bytes.Clone(v.Salt), bytes.Clone(v.XWingPublic), bytes.Clone(v.XWingSealed)
	}
	return &c
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateName reports whether name is a valid tenant name: 1 to 64
// characters of [A-Za-z0-9._-], starting with a letter or digit.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: tenant name must be 1 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit", ErrInvalid)
	}
	return nil
}

// Validate checks a record before it is written.
func (t *Tenant) Validate() error {
	if err := ValidateName(t.Name); err != nil {
		return err
	}
	if t.ID == 0 {
		return fmt.Errorf("%w: tenant id is zero", ErrInvalid)
	}
	if len(t.Versions) == 0 {
		return fmt.Errorf("%w: no key versions", ErrInvalid)
	}
	for i, kv := range t.Versions {
		if err := kv.validate(); err != nil {
			return err
		}
		if i > 0 && kv.Version <= t.Versions[i-1].Version {
			return fmt.Errorf("%w: versions out of order", ErrInvalid)
		}
	}
	if kv, ok := t.Version(t.Current); !ok || kv.State != StateEnabled {
		return fmt.Errorf("%w: current version %d is not an enabled version", ErrInvalid, t.Current)
	}
	return nil
}

func (kv *KeyVersion) validate() error {
	switch {
	case kv.Version == 0:
		return fmt.Errorf("%w: key version 0", ErrInvalid)
	case kv.State == StateDestroyed && kv.Salt != nil:
		return fmt.Errorf("%w: version %d is destroyed but keeps its salt", ErrInvalid, kv.Version)
	case kv.State == StateDestroyed && kv.XWingSealed != nil:
		return fmt.Errorf("%w: version %d is destroyed but keeps its X-Wing private key", ErrInvalid, kv.Version)
	case (kv.XWingSealed == nil) != (kv.XWingPublic == nil) && kv.State != StateDestroyed:
		return fmt.Errorf("%w: version %d has half an X-Wing key pair", ErrInvalid, kv.Version)
	case kv.State != StateDestroyed && (len(kv.Salt) != SaltSize || isZero(kv.Salt)):
		return fmt.Errorf("%w: version %d has no valid salt", ErrInvalid, kv.Version)
	}
	switch kv.State {
	case StateEnabled, StateDisabled, StateDestroyScheduled, StateDestroyed:
		return nil
	}
	return fmt.Errorf("%w: version %d has unknown state %q", ErrInvalid, kv.Version, kv.State)
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Store is the metadata store. Implementations are safe for concurrent use.
// Every method honours ctx where the backend can.
type Store interface {
	// CreateTenant writes a new tenant after t.Validate. It returns
	// ErrExists if the name or the ID is taken. On success it sets
	// t.Revision.
	CreateTenant(ctx context.Context, t *Tenant) error
	// GetTenant returns the tenant named name, or ErrNotFound.
	GetTenant(ctx context.Context, name string) (*Tenant, error)
	// GetTenantByID returns the tenant with the given ID, or ErrNotFound.
	GetTenantByID(ctx context.Context, id uint64) (*Tenant, error)
	// ListTenants returns up to limit tenants whose names sort after
	// `after`, in name order.
	ListTenants(ctx context.Context, after string, limit int) ([]*Tenant, error)
	// UpdateTenant replaces the record of t.Name if its stored revision is
	// still t.Revision (ErrConflict otherwise, ErrNotFound if gone). The
	// name and ID cannot change. On success it sets t.Revision.
	UpdateTenant(ctx context.Context, t *Tenant) error
	// DeleteTenant removes the tenant named name, with every version's
	// salt and its ID, if its stored revision is still revision
	// (ErrConflict otherwise, ErrNotFound if gone). This is
	// crypto-shredding: what the tenant's keys sealed can no longer be
	// decrypted (backups of the store aside: see docs/KEYS.md).
	DeleteTenant(ctx context.Context, name string, revision uint64) error
	// UpdateTenants is UpdateTenant for many tenants in one transaction:
	// all are written or none (the first error is returned, wrapping
	// ErrConflict, ErrNotFound or ErrInvalid and naming the tenant). On
	// success it sets each Revision. For the rotation scheduler.
	UpdateTenants(ctx context.Context, ts []*Tenant) error
	// Close releases the store. It is safe to call twice.
	Close() error
}
