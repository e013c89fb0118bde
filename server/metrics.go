package server

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/hsmd/hsmd/envelope"
)

// Metrics are hsmd's Prometheus metrics. Labels carry method names, codes
// and operation names only: never tenants' data, contexts or keys.
type Metrics struct {
	requests    *prometheus.CounterVec   // method, code
	items       *prometheus.CounterVec   // method, result
	latency     *prometheus.HistogramVec // method
	bytes       *prometheus.CounterVec   // method, direction
	hsmCalls    *prometheus.CounterVec   // op, result
	hsmLatency  *prometheus.HistogramVec // op
	ready       prometheus.Gauge
	tpmUp       prometheus.Gauge
	auditItems  *prometheus.CounterVec
	auditWrite  prometheus.Histogram
	tpmInsecure prometheus.Gauge
	keys        *keyMetrics
	reg         prometheus.Registerer
}

// NewMetrics registers hsmd's metrics with reg and returns them.
// engineStats, if set, is read at every scrape and exported as the DEK cache
// counters. It panics if the metrics are already registered with reg (as
// prometheus.MustRegister does): use one registry per Server.
func NewMetrics(reg prometheus.Registerer, engineStats func() envelope.Stats) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmd_requests_total", Help: "RPCs handled, by method and gRPC code.",
		}, []string{"method", "code"}),
		items: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmd_items_total", Help: "Batch items processed, by method and result (ok or an item error reason).",
		}, []string{"method", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "hsmd_request_duration_seconds", Help: "RPC latency, by method.",
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 18),
		}, []string{"method"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmd_bytes_total", Help: "Item payload bytes processed, by method and direction (in, out).",
		}, []string{"method", "direction"}),
		hsmCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "hsmd_hsm_calls_total", Help: "Calls into the HSM, by operation and result.",
		}, []string{"op", "result"}),
		hsmLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "hsmd_hsm_call_duration_seconds", Help: "HSM call latency, by operation.",
			Buckets: prometheus.ExponentialBuckets(5e-6, 2, 20),
		}, []string{"op"}),
		ready: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmd_ready", Help: "1 while hsmd can serve (HSM usable), else 0.",
		}),
		tpmUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmd_tpm_up", Help: "1 while the TPM answers, else 0 (serving goes on without it).",
		}),
		tpmInsecure: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "hsmd_tpm_insecure", Help: "1 if hsmd runs without a TPM (--insecure-no-tpm).",
		}),
		reg: reg,
	}
	m.auditItems = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "hsmd_audit_entries_total", Help: "Audit log entries written (result ok) or whose write failed and is retried (result error).",
	}, []string{"result"})
	m.auditWrite = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "hsmd_audit_write_duration_seconds", Help: "Time to write one batch of audit entries durably.",
		Buckets: prometheus.ExponentialBuckets(100e-6, 2, 16),
	})
	reg.MustRegister(m.requests, m.items, m.latency, m.bytes, m.hsmCalls, m.hsmLatency, m.ready, m.tpmUp, m.tpmInsecure, m.auditItems, m.auditWrite)
	m.keys = newKeyMetrics(reg)
	if engineStats != nil {
		cache := func(name, help, op string, f func(envelope.Stats) uint64) prometheus.Collector {
			return prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: name, Help: help, ConstLabels: prometheus.Labels{"op": op},
			}, func() float64 { return float64(f(engineStats())) })
		}
		reg.MustRegister(
			cache("hsmd_dek_cache_hits_total", "DEK cache hits (seal: batches, open: groups).", "seal", func(s envelope.Stats) uint64 { return s.SealHits }),
			cache("hsmd_dek_cache_hits_total", "DEK cache hits (seal: batches, open: groups).", "open", func(s envelope.Stats) uint64 { return s.OpenHits }),
			cache("hsmd_dek_cache_misses_total", "DEK cache misses, each one derivation.", "seal", func(s envelope.Stats) uint64 { return s.SealMisses }),
			cache("hsmd_dek_cache_misses_total", "DEK cache misses, each one derivation.", "open", func(s envelope.Stats) uint64 { return s.OpenMisses }),
		)
	}
	return m
}

func (m *Metrics) registerCounter(f func() uint64) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "hsmd_rollback_counter", Help: "The TPM rollback counter value the data directory is bound to.",
	}, func() float64 { return float64(f()) }))
}

// HSMRecovery is what RegisterHSMRecovery exports of the HSM's in-place
// recoveries (hsm.HSM.Recoveries).
type HSMRecovery struct {
	Recoveries, Attempts uint64
	Last                 time.Duration // the last outage recovered from
	Recovering           bool          // down, and recovery is running
}

// RegisterHSMRecovery exports f, read at every scrape, as
// hsmd_hsm_recoveries_total, hsmd_hsm_recovery_attempts_total,
// hsmd_hsm_last_recovery_seconds and hsmd_hsm_recovering.
func (m *Metrics) RegisterHSMRecovery(f func() HSMRecovery) {
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "hsmd_hsm_recoveries_total", Help: "Times the HSM became usable again in place after the token was lost.",
		}, func() float64 { return float64(f().Recoveries) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "hsmd_hsm_recovery_attempts_total", Help: "Attempts to recover the HSM in place, failed ones included.",
		}, func() float64 { return float64(f().Attempts) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "hsmd_hsm_last_recovery_seconds", Help: "How long the last recovered HSM outage lasted, from its first fatal error to usable.",
		}, func() float64 { return f().Last.Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "hsmd_hsm_recovering", Help: "1 while the HSM is unusable and being recovered; 0 otherwise (see hsmd_ready).",
		}, func() float64 {
			if f().Recovering {
				return 1
			}
			return 0
		}),
	)
}

// InstrumentDeriver counts and times d's calls as HSM calls of op "hmac".
func (m *Metrics) InstrumentDeriver(d envelope.Deriver) envelope.Deriver {
	return &instrumentedDeriver{d: d, m: m}
}

type instrumentedDeriver struct {
	d envelope.Deriver
	m *Metrics
}

func (i *instrumentedDeriver) PRF(ctx context.Context, kdkVersion uint32, msg []byte) ([]byte, error) {
	start := time.Now()
	out, err := i.d.PRF(ctx, kdkVersion, msg)
	i.m.hsmLatency.WithLabelValues("hmac").Observe(time.Since(start).Seconds())
	result := "ok"
	if err != nil {
		result = "error"
	}
	i.m.hsmCalls.WithLabelValues("hmac", result).Inc()
	return out, err
}

// ObserveAuditWrite records one write of n audit entries (audit.Config.OnWrite).
func (m *Metrics) ObserveAuditWrite(n int, d time.Duration, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.auditItems.WithLabelValues(result).Add(float64(n))
	m.auditWrite.Observe(d.Seconds())
}
