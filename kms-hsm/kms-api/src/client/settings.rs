//! Where the KMS is ([`Endpoint`], parsed from `unix://` and `https://` URLs) and how the
//! client calls it ([`KmsClientConfig`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use breaker::*;

use super::*;

/// Where the KMS listens.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///absolute/path.sock`
    Unix(PathBuf),
    /// `https://host:port`
    Https { host: String, port: u16 },
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Https { host, port } => write!(f, "https://{host}:{port}"),
        }
    }
}

/// Why an endpoint string was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid KMS endpoint {0:?}: expected unix:///path/to/kms.sock or https://host:port")]
pub struct EndpointError(String);

impl FromStr for Endpoint {
    type Err = EndpointError;
    fn from_str(s: &str) -> Result<Self, EndpointError> {
        let err = || EndpointError(s.to_owned());
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(err());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("https://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = rest.rsplit_once(':').ok_or_else(err)?;
            let port: u16 = port.parse().map_err(|_| err())?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(err());
            }
            return Ok(Endpoint::Https {
                host: host.to_owned(),
                port,
            });
        }
        Err(err())
    }
}

/// Client settings.
#[derive(Clone)]
pub struct KmsClientConfig {
    /// The KMS, or its replicas (at least one; all serve the same keys).
    pub endpoints: Vec<Endpoint>,
    /// Required for `https://` endpoints: trust anchors and the client certificate.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Retries after the first attempt, for transport failures and 503 answers.
    pub max_retries: u32,
    /// The most one call may take, retries and backoff included.
    pub deadline: Duration,
    pub breaker: BreakerConfig,
    /// For `unix://` endpoints: the uid the process serving the socket must run as (checked
    /// with `SO_PEERCRED` on every new connection). A socket squatted by another user's process
    /// is then refused instead of being sent plaintext.
    pub expected_peer_uid: Option<u32>,
    /// Idle connections kept for reuse, per replica.
    pub max_idle: usize,
    /// How often [`KmsClient::spawn_health_checks`] probes each replica's `/readyz`.
    pub health_interval: Duration,
}

impl fmt::Debug for KmsClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClientConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_retries", &self.max_retries)
            .field("deadline", &self.deadline)
            .field("breaker", &self.breaker)
            .field("expected_peer_uid", &self.expected_peer_uid)
            .field("max_idle", &self.max_idle)
            .field("health_interval", &self.health_interval)
            .finish()
    }
}

impl KmsClientConfig {
    /// Defaults: 2 s connect, 10 s request, 2 retries, 5 s deadline, a breaker opening after
    /// 5 failures for 2 s, 32 idle connections, a health check every second.
    pub fn new(endpoint: Endpoint, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self::replicas(vec![endpoint], tls)
    }

    /// [`KmsClientConfig::new`] for several replicas of one KMS.
    pub fn replicas(endpoints: Vec<Endpoint>, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            endpoints,
            tls,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_retries: 2,
            deadline: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            expected_peer_uid: None,
            max_idle: 32,
            health_interval: Duration::from_secs(1),
        }
    }
}
