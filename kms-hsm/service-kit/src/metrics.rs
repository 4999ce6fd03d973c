//! The HTTP request metrics both services export, under their own registry prefix
//! (`progressdb_` for the server, `progressdb_kms_` for the KMS):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `<prefix>_http_requests_total` | counter | `route`, `method`, `status` |
//! | `<prefix>_http_request_duration_seconds` | histogram (250 µs .. 8 s) | `route`, `method`, `status` |
//!
//! `route` is a route template (`/v1/threads/{id}`) or `unknown`, never a raw path, and
//! `method` is one of the standard methods or `other`, so label cardinality is fixed whatever
//! clients send. [`encode`] renders a registry as OpenMetrics text ([`CONTENT_TYPE`]).

use std::time::Duration;

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of both request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 250 µs .. ~8 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Request counter and latency histogram of one service.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: HistogramFamily,
}

impl HttpMetrics {
    /// Registers both metrics in `registry` (whose prefix names the service).
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to answer, by route template, method and status",
            duration.clone(),
        );
        Self { requests, duration }
    }

    /// Counts one answered request.
    pub fn observe(&self, route: &'static str, method: &Method, status: u16, elapsed: Duration) {
        let labels = HttpLabels {
            route,
            method: method_label(method),
            status,
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// A fixed label for `m`: a standard method's name, or `other`.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text of every metric in `registry`. Encoding writes to a `String`, which
/// cannot fail; should a collector fail anyway, what was encoded so far is returned and the
/// failure is logged.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_template_and_bounds_methods() {
        let mut registry = Registry::with_prefix("svc");
        let m = HttpMetrics::register(&mut registry);
        m.observe(
            "/v1/things/{id}",
            &Method::GET,
            200,
            Duration::from_millis(2),
        );
        m.observe(
            "/v1/things/{id}",
            &Method::from_bytes(b"BREW").unwrap(),
            405,
            Duration::from_millis(1),
        );
        let text = encode(&registry);
        assert!(
            text.contains(
                r#"svc_http_requests_total{route="/v1/things/{id}",method="GET",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"method="other",status="405"} 1"#), "{text}");
        assert!(
            text.contains("svc_http_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(!text.contains("BREW"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

/// The metrics of a store's writes, the same in both services under the registry's prefix
/// and a store name (`progressdb_store_*`, `progressdb_kms_keystore_*`):
///
/// | metric | type |
/// |---|---|
/// | `<store>_commits_total` | counter: durable commits (one per group of writes) |
/// | `<store>_writes_total` | counter: writes committed |
/// | `<store>_commit_ops` | histogram: writes per commit |
/// | `<store>_commit_duration_seconds` | histogram: one commit, fsync included |
/// | `<store>_commit_errors_total` | counter: commits that failed (nothing of them written) |
/// | `<store>_map_resizes_total` | counter: LMDB map growths |
/// | `<store>_map_size_bytes` | gauge: the LMDB map's size |
///
/// Both LMDB writers report through [`crate::group_commit::Observer`] (implemented here); the
/// KMS's PostgreSQL store counts commits, writes and errors itself.
#[derive(Debug, Clone)]
pub struct CommitMetrics {
    pub commits: Counter,
    pub writes: Counter,
    pub commit_ops: Histogram,
    pub commit_duration: Histogram,
    pub commit_errors: Counter,
    pub resizes: Counter,
    pub map_size_bytes: prometheus_client::metrics::gauge::Gauge,
}

impl Default for CommitMetrics {
    /// Metrics not attached to any registry (tests, tools).
    fn default() -> Self {
        Self {
            commits: Counter::default(),
            writes: Counter::default(),
            commit_ops: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            commit_duration: latency_histogram(),
            commit_errors: Counter::default(),
            resizes: Counter::default(),
            map_size_bytes: prometheus_client::metrics::gauge::Gauge::default(),
        }
    }
}

impl CommitMetrics {
    /// Registers every metric in `registry` under `store` (`store`, `keystore`).
    pub fn register(registry: &mut Registry, store: &str) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix(store);
        r.register(
            "commits",
            "Durable commits (one per group of writes)",
            m.commits.clone(),
        );
        r.register("writes", "Writes committed", m.writes.clone());
        r.register("commit_ops", "Writes per commit", m.commit_ops.clone());
        r.register(
            "commit_duration_seconds",
            "Duration of one commit (fsync included)",
            m.commit_duration.clone(),
        );
        r.register(
            "commit_errors",
            "Commits that failed (nothing of them was written)",
            m.commit_errors.clone(),
        );
        r.register("map_resizes", "LMDB map growths", m.resizes.clone());
        r.register(
            "map_size_bytes",
            "Current LMDB map size",
            m.map_size_bytes.clone(),
        );
        m
    }

    /// One commit of `writes` writes that took `took`.
    pub fn committed(&self, writes: usize, took: Duration) {
        self.commits.inc();
        self.writes.inc_by(writes as u64);
        self.commit_ops.observe(writes as f64);
        self.commit_duration.observe(took.as_secs_f64());
    }
}
