// Package store keeps hsmd's metadata: tenants, their salts and their key
// versions. It holds no key material that is usable without the HSM: a
// tenant's data keys are derived inside the HSM from the root key (kdk) and
// the tenant's salt.
//
// Two backends implement Store: bbolt (package store/bolt, the embedded
// single-node default) and, later, etcd (clusters). Both must pass the
// conformance suite in package store/storetest.
package store

import (
	"context"
	"errors"
	"fmt"
	"regexp"
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
)

// SaltSize is the size of a tenant's salt in bytes.
const SaltSize = 32

// KeyState is the state of a tenant key version. The rotation issue adds
// more states; for now every version is enabled.
type KeyState string

// Key version states.
const (
	StateEnabled KeyState = "enabled"
)

// KeyVersion is one version of a tenant's (virtual) key.
type KeyVersion struct {
	Version    uint32    `json:"version"`
	KDKVersion uint32    `json:"kdk_version"` // root key version it derives from
	State      KeyState  `json:"state"`
	CreateTime time.Time `json:"create_time"`
}

// Tenant is a tenant's metadata. Salt is not a key, but together with the
// HSM's kdk it defines every data key of the tenant: destroying it is what
// crypto-shredding means.
type Tenant struct {
	Name       string         `json:"name"`
	ID         uint64         `json:"id"` // random, non-zero, unique; carried in ciphertexts
	Salt       [SaltSize]byte `json:"salt"`
	Current    uint32         `json:"current"` // version new encryptions use
	Versions   []KeyVersion   `json:"versions"`
	CreateTime time.Time      `json:"create_time"`
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
	if t.Salt == ([SaltSize]byte{}) {
		return fmt.Errorf("%w: tenant salt is zero", ErrInvalid)
	}
	if _, ok := t.Version(t.Current); !ok {
		return fmt.Errorf("%w: current version %d is not among the versions", ErrInvalid, t.Current)
	}
	return nil
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
	// Close releases the store. It is safe to call twice.
	Close() error
}
