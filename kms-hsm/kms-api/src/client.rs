//! HTTP client of the KMS, over a Unix socket or HTTPS with a client certificate, to one KMS
//! or to several replicas serving the same keys.
//!
//! * Replicas ([`KmsClientConfig::endpoints`]): calls are spread round-robin over the
//!   endpoints whose circuit is closed; an attempt that fails on one (transport error, 503) is
//!   sent at once to the next replica not tried yet in that call, so losing one replica fails
//!   no call while another is up. Only once every replica was tried does the call back off
//!   and retry. A background health check ([`KmsClient::spawn_health_checks`]) probes every
//!   replica's `/readyz`, each on its own schedule, so a failing one is ejected (its circuit
//!   opens) before user calls find it, and a recovered one is taken back. A call that finds
//!   the replicas it tried failed and the others ejected has those probed at once and waits
//!   for them (once, within the health interval) rather than fail while one is back.
//! * Connections are reused: a small pool of HTTP/1.1 connections per replica, each driven by
//!   its own task.
//! * Every call has a connect timeout and a request timeout.
//! * Transport failures and `503` answers are retried a bounded number of times with
//!   exponential backoff, all within one deadline per call ([`KmsClientConfig::deadline`]):
//!   each attempt gets what is left of it, and no retry starts that could not finish in it.
//!   Every KMS call is safe to retry, on the same replica or another: encrypt/decrypt/
//!   get_wrapped have no side effect, destroy is idempotent, and `create_dek_for_thread`
//!   carries one idempotency key for all its attempts, so an attempt whose answer was lost
//!   (a replica killed after its commit) and its retry elsewhere give the same key.
//! * A circuit breaker per replica ([`BreakerConfig`]): after that many consecutive failed attempts
//!   (transport errors and `503 unavailable`; not `overloaded`, which is a live KMS shedding
//!   load) the client fails every call at once for the cooldown, then lets one call through
//!   as a probe: its success closes the circuit, its failure opens it again. [`KmsClient::ready`]
//!   always goes to the KMS, so a readiness probe finds it back too.
//! * Errors keep the KMS's stable [`ErrorCode`]; no error carries request bodies.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;

use crate::wire::ErrorCode;

mod admin;
mod breaker;
mod calls;
mod failover;
mod health;
mod pool;
mod settings;

pub use settings::*;

pub use breaker::BreakerConfig;
use breaker::*;

/// A failed KMS call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The KMS could not be reached, timed out, answered 503 `unavailable`, or the circuit is
    /// open after repeated failures.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// The KMS answered 503 `overloaded`: it is up, and shedding load.
    #[error("KMS overloaded: {0}")]
    Overloaded(String),
    /// The KMS answered with an error body.
    #[error("KMS error {status} {code:?}: {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// The KMS answered something that is not the documented protocol.
    #[error("KMS protocol error: {0}")]
    Protocol(String),
    /// The client was misconfigured (e.g. https endpoint without TLS settings).
    #[error("KMS client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The KMS's stable code, when the KMS answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            ClientError::Unavailable(_) => Some(ErrorCode::Unavailable),
            ClientError::Overloaded(_) => Some(ErrorCode::Overloaded),
            _ => None,
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable(_) | ClientError::Overloaded(_)
        )
    }

    /// Whether this attempt counts against the KMS's health (opens the circuit).
    fn counts_as_failure(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// Largest answer the client reads (a batch of 1024 items of 1 MiB, in base64, and framing).
const MAX_ANSWER_BYTES: usize = 1536 << 20;

/// One replica: where it is, its idle connections and its circuit.
struct Replica {
    endpoint: Endpoint,
    tls: Option<tokio_rustls::TlsConnector>,
    idle: Mutex<Vec<Sender>>,
    breaker: Breaker,
    /// Wakes this replica's health check before its next tick: a call that found every
    /// circuit open asks for a probe now instead of waiting for the interval.
    probe_now: Arc<tokio::sync::Notify>,
}

/// Least time between the starts of two probes of one replica (a call storm that keeps
/// asking for probes of a dead replica costs it one connection attempt per this).
const MIN_PROBE_GAP: Duration = Duration::from_millis(50);

struct Inner {
    cfg: KmsClientConfig,
    replicas: Vec<Replica>,
    /// Round-robin position of the next call's first attempt.
    next: std::sync::atomic::AtomicUsize,
}

/// A cheap-to-clone handle to the KMS.
#[derive(Clone)]
pub struct KmsClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClient")
            .field("endpoints", &self.inner.cfg.endpoints)
            .finish()
    }
}

impl KmsClient {
    /// # Errors
    /// [`ClientError::Config`] without endpoints, or for an `https://` endpoint without TLS
    /// settings.
    pub fn new(cfg: KmsClientConfig) -> Result<Self, ClientError> {
        if cfg.endpoints.is_empty() {
            return Err(ClientError::Config("no KMS endpoint".into()));
        }
        let mut replicas = Vec::with_capacity(cfg.endpoints.len());
        for endpoint in &cfg.endpoints {
            let tls =
                match (endpoint, &cfg.tls) {
                    (Endpoint::Https { .. }, None) => return Err(ClientError::Config(
                        "an https:// KMS endpoint needs kms.ca, kms.client_cert and kms.client_key"
                            .into(),
                    )),
                    (Endpoint::Https { .. }, Some(t)) => {
                        Some(tokio_rustls::TlsConnector::from(t.clone()))
                    }
                    (Endpoint::Unix(_), _) => None,
                };
            replicas.push(Replica {
                endpoint: endpoint.clone(),
                tls,
                idle: Mutex::new(Vec::new()),
                breaker: Breaker::new(cfg.breaker),
                probe_now: Arc::new(tokio::sync::Notify::new()),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                replicas,
                next: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// The first replica: where calls that are sent once go (admin calls, whose client has
    /// one endpoint, the admin socket). `new` refuses an empty list, so there is one.
    fn first(&self) -> &Replica {
        &self.inner.replicas[0]
    }

    /// The replicas, in configuration order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.inner.cfg.endpoints
    }

    /// Retries after a first failed attempt (transport errors, 503), as configured.
    pub fn max_retries(&self) -> u32 {
        self.inner.cfg.max_retries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "unix:///run/kms.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/kms.sock".into())
        );
        assert_eq!(
            "https://localhost:7443".parse::<Endpoint>().unwrap(),
            Endpoint::Https {
                host: "localhost".into(),
                port: 7443
            }
        );
        assert!("http://localhost:1".parse::<Endpoint>().is_err());
        assert!("unix://relative.sock".parse::<Endpoint>().is_err());
        assert!("https://nohost".parse::<Endpoint>().is_err());
    }
}
