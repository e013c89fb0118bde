package server

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hsmd/hsmd/rotation"
	"github.com/hsmd/hsmd/store"
)

// keyMetrics describe the tenants' keys in aggregate: no per-tenant labels
// (a tenant count would make the series unbounded).
type keyMetrics struct {
	versions   *prometheus.GaugeVec   // state
	oldest     prometheus.Gauge       // age of the oldest current version
	next       prometheus.Gauge       // seconds to the earliest rotation due
	changes    *prometheus.CounterVec // op
	refreshErr prometheus.Counter
}

func newKeyMetrics(reg prometheus.Registerer) *keyMetrics {
	k := &keyMetrics{
		versions: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "hsmd_key_versions", Help: "Tenant key versions by state, at the last refresh.",
		}, []string{"state"}),
		oldest: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmd_key_oldest_current_age_seconds", Help: "Age of the oldest current tenant key version.",
		}),
		next: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmd_key_next_rotation_seconds", Help: "Time until the earliest automatic rotation (negative: overdue).",
		}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmd_key_changes_total", Help: "Committed key changes, by operation (rotation.Op*: rotate, rotate_usage, disable, enable, schedule_destroy, cancel_destroy, destroy, set_policy, shred).",
		}, []string{"op"}),
		refreshErr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "hsmd_key_metrics_refresh_errors_total", Help: "Failed refreshes of the key gauges.",
		}),
	}
	reg.MustRegister(k.versions, k.oldest, k.next, k.changes, k.refreshErr)
	return k
}

// KeyChanged counts committed key changes (the daemon calls it from the
// rotation manager's and scheduler's hooks).
func (s *Server) KeyChanged(cs ...rotation.Change) {
	for _, c := range cs {
		s.cfg.Metrics.keys.changes.WithLabelValues(c.Op).Inc()
	}
}

// RefreshKeyMetrics recomputes the key gauges from the store: one pass over
// every tenant, so the daemon runs it every few minutes, not per scrape.
func (s *Server) RefreshKeyMetrics(ctx context.Context) error {
	counts := map[store.KeyState]int{}
	now := s.cfg.Now()
	var oldest, next time.Duration
	first := true
	after := ""
	for {
		page, err := s.cfg.Store.ListTenants(ctx, after, MaxPageSize)
		if err != nil {
			s.cfg.Metrics.keys.refreshErr.Inc()
			return err
		}
		for _, t := range page {
			for _, kv := range t.Versions {
				counts[kv.State]++
			}
			if cur, ok := t.Version(t.Current); ok {
				oldest = max(oldest, now.Sub(cur.CreateTime))
			}
			if at, ok := rotation.NextRotation(t); ok && (first || at.Sub(now) < next) {
				next, first = at.Sub(now), false
			}
		}
		if len(page) < MaxPageSize {
			break
		}
		after = page[len(page)-1].Name
	}
	m := s.cfg.Metrics.keys
	for _, st := range []store.KeyState{store.StateEnabled, store.StateDisabled, store.StateDestroyScheduled, store.StateDestroyed} {
		m.versions.WithLabelValues(string(st)).Set(float64(counts[st]))
	}
	m.oldest.Set(oldest.Seconds())
	m.next.Set(next.Seconds())
	return nil
}

// WatchKeys refreshes the key gauges every interval until ctx is done.
func (s *Server) WatchKeys(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := s.RefreshKeyMetrics(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("refreshing the key metrics", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
