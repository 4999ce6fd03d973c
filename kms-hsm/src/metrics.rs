//! Prometheus metrics (`GET /metrics`, OpenMetrics text), all prefixed `progressdb_kms_`:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `progressdb_kms_http_requests_total` | counter | `route`, `method`, `status` |
//! | `progressdb_kms_http_request_duration_seconds` | histogram | `route`, `method`, `status` |
//! | `progressdb_kms_hsm_calls_total` | counter | |
//! | `progressdb_kms_hsm_errors_total` | counter | |
//! | `progressdb_kms_hsm_recoveries_total` | counter | |
//! | `progressdb_kms_hsm_ready` | gauge (0/1) | |
//! | `progressdb_kms_hsm_resets_total` (library resets: `C_Finalize` + `C_Initialize`) | counter | |
//! | `progressdb_kms_hsm_login_failures_total` (PIN refused; at most one per token) | counter | |
//! | `progressdb_kms_hsm_pin_rejected` (1: the KMS will not log in again until restarted) | gauge | |
//! | `progressdb_kms_hsm_sessions` (sessions open now) | gauge | |
//! | `progressdb_kms_hsm_overloaded_total` (jobs refused: every HSM queue full) | counter | |
//! | `progressdb_kms_hsm_resident_loads_total` (DEK session objects made in the HSM) | counter | |
//! | `progressdb_kms_hsm_dek_imports_total` (`AesGcmV1` DEKs imported into the HSM) | counter | |
//! | `progressdb_kms_connections_open` | gauge | |
//! | `progressdb_kms_connections_refused_total` (answered 503 overloaded) | counter | `reason` (`global`, `peer`) |
//! | `progressdb_kms_cache_hits_total`, `_misses_total` | counter | |
//! | `progressdb_kms_cache_entries` | gauge | |
//! | `progressdb_kms_keystore_*`: the store's commit metrics ([`service_kit::metrics::CommitMetrics`]: `commits_total`, `writes_total`, `commit_ops`, `commit_duration_seconds`, `commit_errors_total`, `map_resizes_total`, `map_size_bytes`) | | |
//!
//! The two request metrics are [`service_kit::metrics::HttpMetrics`], the same as the
//! server's. HSM counters are read from the backend at scrape time ([`BackendStats`]).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use service_kit::metrics::HttpMetrics;
pub use service_kit::metrics::CONTENT_TYPE;

use crate::backend::KeyBackend;
use crate::cache::CacheMetrics;

/// HSM counters of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HsmCounters {
    pub calls: u64,
    pub errors: u64,
    pub recoveries: u64,
    pub resets: u64,
    pub login_failures: u64,
    pub pin_rejected: bool,
    pub sessions_open: i64,
    pub overloaded: u64,
    pub workers: usize,
    pub resident_loads: u64,
    pub imports: u64,
}

/// A backend that counts its HSM calls. Kept apart from [`KeyBackend`] so that trait stays
/// about keys.
pub trait BackendStats {
    fn hsm_counters(&self) -> HsmCounters;

    /// The token's capability profile (read once at open), for `status`.
    fn token_capabilities(&self) -> Option<kms_api::admin::TokenCapabilities> {
        None
    }
}

impl BackendStats for crate::backend::pkcs11::Pkcs11Backend {
    fn token_capabilities(&self) -> Option<kms_api::admin::TokenCapabilities> {
        let p = self.profile();
        Some(kms_api::admin::TokenCapabilities {
            library: p.library.clone(),
            token: p.token.clone(),
            dek_wrap: p.dek_wrap.to_owned(),
            key_wrap: p.key_wrap.iter().map(|m| (*m).to_owned()).collect(),
            max_sessions: p.max_sessions,
            sensitive_values_enforced: p.sensitive_values_enforced,
            dek_residency: crate::backend::KeyBackend::residency(self)
                .as_str()
                .to_owned(),
        })
    }

    fn hsm_counters(&self) -> HsmCounters {
        let s = self.stats();
        HsmCounters {
            calls: s.calls,
            errors: s.errors,
            recoveries: s.recoveries,
            resets: s.resets,
            login_failures: s.login_failures,
            pin_rejected: s.pin_rejected,
            sessions_open: s.sessions_open,
            overloaded: s.overloaded,
            workers: s.workers,
            resident_loads: s.resident_loads,
            imports: s.imports,
        }
    }
}

/// Key-store metrics: the shared set, `progressdb_kms_keystore_*` (the PostgreSQL store
/// counts commits, writes and errors; the LMDB writer all of them).
pub type StoreMetrics = service_kit::metrics::CommitMetrics;

/// The registry and the handles the layers update.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub cache: CacheMetrics,
    pub store: StoreMetrics,
    hsm: HsmView,
    token: Option<kms_api::admin::TokenCapabilities>,
}

/// Reads the backend's HSM counters and state (for `status`), whatever the backend type.
struct HsmView(Box<dyn Fn() -> (HsmCounters, crate::backend::BackendState) + Send + Sync>);

impl std::fmt::Debug for HsmView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HsmView")
    }
}

struct HsmCollector<B> {
    backend: Arc<B>,
}

impl<B> std::fmt::Debug for HsmCollector<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HsmCollector")
    }
}

impl<B: KeyBackend + BackendStats> Collector for HsmCollector<B> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.backend.hsm_counters();
        let mem = service_kit::locked::status();
        for (name, help, v) in [
            ("hsm_calls", "PKCS#11 operations sent to the HSM", c.calls),
            ("hsm_errors", "PKCS#11 operations that failed", c.errors),
            (
                "hsm_recoveries",
                "Times the HSM sessions were reopened after a failure",
                c.recoveries,
            ),
            (
                "hsm_resets",
                "PKCS#11 library resets (C_Finalize + C_Initialize) after a lost session or token",
                c.resets,
            ),
            (
                "hsm_login_failures",
                "Logins the token refused for the PIN (never retried)",
                c.login_failures,
            ),
            (
                "hsm_overloaded",
                "HSM jobs refused because every worker queue was full",
                c.overloaded,
            ),
            (
                "hsm_resident_loads",
                "DEK session objects made inside the HSM (hsm.dek_residency = hsm)",
                c.resident_loads,
            ),
            (
                "hsm_dek_imports",
                "DEKs of AesGcmV1 blobs that passed through the KMS to become HSM session objects",
                c.imports,
            ),
            (
                "key_memory_unlocked_keys",
                "DEKs held in unlocked memory because every slot of the locked arena was taken",
                mem.unlocked_keys,
            ),
        ] {
            let m = ConstCounter::new(v);
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        for (name, help, v) in [
            (
                "hsm_pin_rejected",
                "1 when the token refused the PIN: no login is tried until a restart",
                i64::from(c.pin_rejected),
            ),
            ("hsm_sessions", "PKCS#11 sessions open now", c.sessions_open),
            (
                "key_memory_locked",
                "1 when the arena DEKs are held in is locked into RAM (mlock), 0 when the OS refused",
                i64::from(mem.locking == service_kit::locked::Locking::Locked),
            ),
            (
                "key_memory_slots",
                "32-byte slots of the locked key arena",
                gauge_i64(mem.slots),
            ),
            (
                "key_memory_in_use",
                "Slots of the locked key arena holding a DEK now",
                gauge_i64(mem.in_use),
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let ready = ConstGauge::new(i64::from(self.backend.is_ready()));
        ready.encode(encoder.encode_descriptor(
            "hsm_ready",
            "1 when the HSM backend can serve, 0 while it recovers",
            None,
            ready.metric_type(),
        )?)?;
        Ok(())
    }
}

fn gauge_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Registers every metric; HSM counters are read from `backend` at each scrape.
    pub fn new<B: KeyBackend + BackendStats>(
        backend: Arc<B>,
        gate: Arc<service_kit::conn::ConnectionGate>,
    ) -> Self {
        let mut registry = Registry::with_prefix("progressdb_kms");
        let http = HttpMetrics::register(&mut registry);
        let cache = CacheMetrics::default();
        registry.register("cache_hits", "DEK cache hits", cache.hits.clone());
        registry.register("cache_misses", "DEK cache misses", cache.misses.clone());
        registry.register(
            "cache_entries",
            "DEKs currently cached",
            cache.entries.clone(),
        );
        let store = StoreMetrics::register(&mut registry, "keystore");
        let token = backend.token_capabilities();
        let view = backend.clone();
        let hsm = HsmView(Box::new(move || (view.hsm_counters(), view.state())));
        registry.register_collector(Box::new(HsmCollector { backend }));
        registry.register_collector(Box::new(service_kit::conn::GateCollector(gate)));
        Self {
            registry,
            http,
            cache,
            store,
            hsm,
            token,
        }
    }

    /// The token's capability profile, when the backend is a PKCS#11 token.
    pub fn token_capabilities(&self) -> Option<&kms_api::admin::TokenCapabilities> {
        self.token.as_ref()
    }

    /// The backend's HSM counters and state now.
    pub fn hsm(&self) -> (HsmCounters, crate::backend::BackendState) {
        (self.hsm.0)()
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        service_kit::metrics::encode(&self.registry)
    }
}
