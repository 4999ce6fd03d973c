//! Prometheus metrics (`prometheus-client`), served as text on `GET /metrics`.
//!
//! | metric | labels |
//! |---|---|
//! | `progressdb_http_requests_total` | `route`, `method`, `status` |
//! | `progressdb_http_request_duration_seconds` | `route`, `method`, `status` |
//! | `progressdb_store_*`: the group-commit writer's metrics ([`service_kit::metrics::CommitMetrics`]: commits, writes, ops and duration per commit, errors, map resizes and size) | |
//! | `progressdb_kms_calls_total` | `op`, `outcome` |
//! | `progressdb_kms_batch_items` | `op` |
//! | `progressdb_connections_open`, `progressdb_connections_refused_total` (503 overloaded) | `reason` |
//! | `progressdb_kms_fallback_decrypts_total` | |
//! | `progressdb_plain_records_refused_total` (plain records met in encrypted threads) | |
//! | `progressdb_kms_shred_failures_total` (thread deletes refused: the KMS did not know the DEK) | |
//!
//! The two request metrics are [`service_kit::metrics::HttpMetrics`], the same as the KMS's;
//! routes are templates (`/v1/threads/{id}`), never raw paths, so label cardinality is fixed.

use std::fmt;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use service_kit::metrics::HttpMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// Store (LMDB writer) metrics: the shared set, `progressdb_store_*`.
pub type StoreMetrics = service_kit::metrics::CommitMetrics;

/// Key-provider metrics.
#[derive(Debug, Clone)]
pub struct KmsMetrics {
    pub calls: Family<KmsLabels, Counter>,
    pub batch_items: HistogramFamily<OpLabels>,
    pub fallback_decrypts: Counter,
    /// Plain records refused because their thread has a DEK.
    pub plain_refused: Counter,
    /// Thread deletions refused because the KMS did not know the DEK.
    pub shred_failures: Counter,
}

impl Default for KmsMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            batch_items: Family::new_with_constructor(batch_histogram),
            fallback_decrypts: Counter::default(),
            plain_refused: Counter::default(),
            shred_failures: Counter::default(),
        }
    }
}

impl KmsMetrics {
    pub fn call(&self, op: &'static str, outcome: &'static str) {
        self.calls.get_or_create(&KmsLabels { op, outcome }).inc();
    }
}

/// Every metric of the process and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub store: StoreMetrics,
    pub kms: KmsMetrics,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    /// Metrics with a gate of their own (for tools and tests).
    fn default() -> Self {
        Self::new(service_kit::conn::ConnectionGate::new(
            service_kit::conn::ConnectionLimits {
                max_connections: 1024,
                max_per_peer: 1024,
            },
        ))
    }
}

impl Metrics {
    pub fn new(gate: std::sync::Arc<service_kit::conn::ConnectionGate>) -> Self {
        let mut registry = Registry::with_prefix("progressdb");
        registry.register_collector(Box::new(service_kit::conn::GateCollector(gate)));
        let http = HttpMetrics::register(&mut registry);
        let store = StoreMetrics::register(&mut registry, "store");
        let kms = KmsMetrics::default();
        registry.register(
            "kms_calls",
            "Key-provider calls by operation and outcome",
            kms.calls.clone(),
        );
        registry.register(
            "kms_batch_items",
            "Items per key-provider batch call",
            kms.batch_items.clone(),
        );
        registry.register(
            "kms_fallback_decrypts",
            "Decryptions done locally with the dev master key while the KMS was unreachable",
            kms.fallback_decrypts.clone(),
        );
        registry.register(
            "plain_records_refused",
            "Plain message records refused because their thread has a DEK",
            kms.plain_refused.clone(),
        );
        registry.register(
            "kms_shred_failures",
            "Thread deletions refused because the KMS did not know the thread's DEK",
            kms.shred_failures.clone(),
        );
        Self {
            registry,
            http,
            store,
            kms,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        service_kit::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        let m = Metrics::default();
        m.http.observe(
            "/v1/threads",
            &http::Method::GET,
            200,
            std::time::Duration::from_millis(1),
        );
        m.kms.call("decrypt_batch", "ok");
        let s = m.encode();
        assert!(s.contains("progressdb_http_requests_total{route=\"/v1/threads\",method=\"GET\",status=\"200\"} 1"), "{s}");
        assert!(s.contains("progressdb_kms_calls_total"), "{s}");
        assert!(s.contains("# EOF"));
    }
}
