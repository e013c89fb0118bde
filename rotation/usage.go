package rotation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hsmd/hsmd/store"
)

// OpUsage is the Change.Op of a rotation that a usage limit triggered.
const OpUsage = "rotate_usage"

// MinMaxDEKsPerVersion is the lowest usage limit a policy may set: each
// rotation it triggers is a store write and a rollback-counter advance.
const MinMaxDEKsPerVersion = 16

// RecordDEK counts n data keys derived to encrypt under version v of the
// tenant (the envelope engine draws one per seed) and, if the tenant's
// Policy.MaxDEKsPerVersion is reached while v is current, rotates the
// tenant in the same write. It returns whether it rotated. Counting is
// best effort: a DEK derived just before a crash may go uncounted.
func (m *Manager) RecordDEK(ctx context.Context, name string, v uint32, n uint64) (bool, error) {
	for attempt := 1; ; attempt++ {
		t, err := m.Store.GetTenant(ctx, name)
		if err != nil {
			return false, fmt.Errorf("rotation: count a data key of tenant %q: %w", name, err)
		}
		rotated, err := countDEK(t, v, n, m.kdk(), m.now(), m.rand())
		if err != nil {
			return false, err
		}
		err = m.Store.UpdateTenant(ctx, t)
		if err == nil {
			if rotated && m.OnChange != nil {
				err = m.OnChange(ctx, Change{Op: OpUsage, Tenant: t.Name, TenantID: t.ID, Versions: []uint32{t.Current}})
			}
			return rotated, err
		}
		if !errors.Is(err, store.ErrConflict) || attempt >= m.retries() {
			return false, fmt.Errorf("rotation: count a data key of tenant %q: %w", name, err)
		}
		if err := backoff(ctx, attempt); err != nil {
			return false, err
		}
	}
}

// countDEK is RecordDEK's change to t.
func countDEK(t *store.Tenant, v uint32, n uint64, kdk uint32, now time.Time, r io.Reader) (bool, error) {
	for i := range t.Versions {
		if t.Versions[i].Version == v {
			t.Versions[i].DEKs += n
			max := t.Policy.MaxDEKsPerVersion
			if max == 0 || v != t.Current || t.Versions[i].DEKs < max {
				return false, nil
			}
			_, err := Rotate(t, kdk, now, r)
			return err == nil, err
		}
	}
	return false, fmt.Errorf("%w: version %d of tenant %q", ErrNoVersion, v, t.Name)
}
