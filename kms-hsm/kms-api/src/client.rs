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
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ids::{IdempotencyKey, KeyId, ThreadId};
use crate::wire::{
    to_json_zeroizing, BatchResponse, Bytes64, CreateDekRequest, CreateDekResponse, DecryptRequest,
    DecryptResponse, DestroyKeyRequest, DestroyKeyResponse, EncryptRequest, EncryptResponse,
    ErrorBody, ErrorCode, GetWrappedResponse, ItemResult, SecretBytes,
};

mod admin;
mod breaker;
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

    /// Starts the background health check: every [`KmsClientConfig::health_interval`], each
    /// replica's `/readyz` is probed (past its circuit); a failure counts against it like a
    /// failed call, a success closes its circuit. From then on only these probes close an open
    /// circuit: calls never wait as the half-open probe ([`BreakerConfig`]). With several
    /// replicas it also ejects a dead one before calls find it, and a call that finds every
    /// circuit open has the open ones probed at once. Each replica is probed on its own
    /// schedule, so a hung one (whose probe waits out its timeout) delays no other's. Stops
    /// when every clone of the client is gone. Must run inside a tokio runtime.
    pub fn spawn_health_checks(&self) -> tokio::task::JoinHandle<()> {
        // With one endpoint, no call is let through as the half-open probe: it would wait
        // out a hung KMS. With several, a call that finds a circuit open fails over to another
        // replica, and one whose cooldown is over is tried again as before.
        if self.inner.replicas.len() == 1 {
            for r in &self.inner.replicas {
                r.breaker
                    .probed_in_background
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let weak = Arc::downgrade(&self.inner);
        let every = self
            .inner
            .cfg
            .health_interval
            .max(Duration::from_millis(50));
        // Aborted or ended, the task hands closing circuits back to half-open calls.
        let guard = BackgroundProbes(weak.clone());
        let watches: Vec<_> = self
            .inner
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| Self::watch_replica(weak.clone(), i, r.probe_now.clone(), every))
            .collect();
        tokio::spawn(async move {
            let _guard = guard;
            futures_util::future::join_all(watches).await;
        })
    }

    /// Probes replica `i` every `every`, or sooner when a call asks (`probe_now`), but never
    /// twice within [`MIN_PROBE_GAP`]. Ends when the client is gone (it holds no strong
    /// reference between probes).
    async fn watch_replica(
        weak: std::sync::Weak<Inner>,
        i: usize,
        probe_now: Arc<tokio::sync::Notify>,
        every: Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = probe_now.notified() => {}
            }
            let began = tokio::time::Instant::now();
            {
                let Some(inner) = weak.upgrade() else { return };
                let _ = KmsClient { inner }.probe(i).await;
            }
            tokio::time::sleep_until(began + MIN_PROBE_GAP).await;
        }
    }

    /// `/readyz` of replica `i`, past its circuit; the outcome is recorded in it.
    async fn probe(&self, i: usize) -> Result<(), ClientError> {
        let cfg = &self.inner.cfg;
        let timeout = cfg.request_timeout.min(cfg.deadline);
        let replica = &self.inner.replicas[i];
        let began = Instant::now();
        let r = match self
            .raw_once(replica, Method::GET, "/readyz", Bytes::new(), timeout)
            .await
        {
            Ok((StatusCode::OK, _)) => Ok(()),
            Ok((status, _)) => Err(ClientError::Unavailable(format!(
                "{} /readyz answered {status}",
                replica.endpoint
            ))),
            Err(e) => Err(e),
        };
        replica.breaker.record(
            Admission::Normal,
            Outcome::of(r.as_ref().err(), began.elapsed(), timeout),
        );
        r
    }

    /// Retries after a first failed attempt (transport errors, 503), as configured.
    pub fn max_retries(&self) -> u32 {
        self.inner.cfg.max_retries
    }

    /// Creates a DEK for `thread_id`.
    ///
    /// # Errors
    /// [`ClientError`]; `Unavailable` when the KMS or its HSM is down.
    pub async fn create_dek_for_thread(
        &self,
        thread_id: &ThreadId,
    ) -> Result<CreateDekResponse, ClientError> {
        // One key for every attempt of this call, on whichever replica: an attempt whose
        // answer was lost is answered again, not made twice.
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| ClientError::Config("the system random generator failed".into()))?;
        let req = CreateDekRequest {
            thread_id: thread_id.clone(),
            idempotency_key: Some(
                IdempotencyKey::parse(&hex::encode(nonce))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?,
            ),
        };
        self.call_json(Method::POST, "/create_dek_for_thread", Some(&req))
            .await
    }

    /// Encrypts `plaintext` under `key_id`'s DEK with `aad`.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownKey, .. }` for an unknown key.
    pub async fn encrypt(
        &self,
        key_id: &KeyId,
        plaintext: &[u8],
        aad: Option<&[u8]>,
    ) -> Result<EncryptResponse, ClientError> {
        let req = EncryptRequest {
            key_id: key_id.clone(),
            plaintext: SecretBytes::new(plaintext.to_vec()),
            aad: aad.map(|a| Bytes64(a.to_vec())),
        };
        self.call_json(Method::POST, "/encrypt", Some(&req)).await
    }

    /// Decrypts `ciphertext` (`nonce | ct | tag`) under `key_id`'s DEK with `aad`.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: DecryptionFailed, .. }` for any authentication failure.
    pub async fn decrypt(
        &self,
        key_id: &KeyId,
        ciphertext: &[u8],
        aad: Option<&[u8]>,
    ) -> Result<SecretBytes, ClientError> {
        let req = DecryptRequest {
            key_id: key_id.clone(),
            ciphertext: Bytes64(ciphertext.to_vec()),
            aad: aad.map(|a| Bytes64(a.to_vec())),
        };
        let r: DecryptResponse = self.call_json(Method::POST, "/decrypt", Some(&req)).await?;
        Ok(r.plaintext)
    }

    /// One call for many encryptions; one result per item, in order.
    ///
    /// # Errors
    /// [`ClientError`] when the whole call fails; per-item failures are in the results.
    pub async fn encrypt_batch(
        &self,
        items: &[EncryptRequest],
    ) -> Result<Vec<ItemResult<EncryptResponse>>, ClientError> {
        let refs: Vec<&EncryptRequest> = items.iter().collect();
        self.encrypt_batch_refs(&refs).await
    }

    /// [`KmsClient::encrypt_batch`] of borrowed items (to resend some of a batch).
    ///
    /// # Errors
    /// As [`KmsClient::encrypt_batch`].
    pub async fn encrypt_batch_refs(
        &self,
        items: &[&EncryptRequest],
    ) -> Result<Vec<ItemResult<EncryptResponse>>, ClientError> {
        let r: BatchResponse<EncryptResponse> = self
            .call_json(Method::POST, "/encrypt_batch", Some(&BatchItems { items }))
            .await?;
        check_len(items.len(), r.results)
    }

    /// One call for many decryptions; one result per item, in order.
    ///
    /// # Errors
    /// [`ClientError`] when the whole call fails; per-item failures are in the results.
    pub async fn decrypt_batch(
        &self,
        items: &[DecryptRequest],
    ) -> Result<Vec<ItemResult<DecryptResponse>>, ClientError> {
        let refs: Vec<&DecryptRequest> = items.iter().collect();
        self.decrypt_batch_refs(&refs).await
    }

    /// [`KmsClient::decrypt_batch`] of borrowed items (to resend some of a batch).
    ///
    /// # Errors
    /// As [`KmsClient::decrypt_batch`].
    pub async fn decrypt_batch_refs(
        &self,
        items: &[&DecryptRequest],
    ) -> Result<Vec<ItemResult<DecryptResponse>>, ClientError> {
        let r: BatchResponse<DecryptResponse> = self
            .call_json(Method::POST, "/decrypt_batch", Some(&BatchItems { items }))
            .await?;
        check_len(items.len(), r.results)
    }

    /// The wrapped DEK and KEK metadata of `key_id`.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownKey, .. }` for an unknown key.
    pub async fn get_wrapped(&self, key_id: &KeyId) -> Result<GetWrappedResponse, ClientError> {
        let path = format!("/get_wrapped?key_id={}", key_id.as_str());
        self.call_json::<(), _>(Method::GET, &path, None).await
    }

    /// Destroys `key_id`'s DEK (its wrapped form and any cached copy). Idempotent: destroying
    /// a destroyed key succeeds.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownKey, .. }` for a key that never existed.
    pub async fn destroy_key(&self, key_id: &KeyId) -> Result<DestroyKeyResponse, ClientError> {
        let req = DestroyKeyRequest {
            key_id: key_id.clone(),
        };
        self.call_json(Method::POST, "/destroy_key", Some(&req))
            .await
    }

    /// `Ok(())` when the KMS (with replicas: at least one of them) answers `/readyz` with
    /// 200. Every replica is probed, past its circuit, so a readiness probe finds a KMS back
    /// and closes its circuit.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] otherwise (the first replica's reason).
    pub async fn ready(&self) -> Result<(), ClientError> {
        let probes = (0..self.inner.replicas.len()).map(|i| self.probe(i));
        let results = futures_util::future::join_all(probes).await;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| ClientError::Unavailable("no KMS endpoint".into())))
    }

    /// Sends raw bytes once (no retry) to the first replica and returns the status and body.
    /// For tests and tools.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] for transport failures.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ClientError> {
        let timeout = self.inner.cfg.request_timeout;
        let (s, b) = self
            .raw_once(self.first(), method, path, Bytes::from(body), timeout)
            .await?;
        Ok((s.as_u16(), b))
    }

    /// The replica for the next attempt of a call: from the call's round-robin start, the
    /// first one not `tried` yet whose circuit admits a call. `None` when there is none.
    fn pick(&self, start: usize, tried: &[bool]) -> Option<(usize, Admission)> {
        let n = self.inner.replicas.len();
        (0..n).map(|k| (start + k) % n).find_map(|i| {
            if tried[i] {
                return None;
            }
            self.inner.replicas[i].breaker.admit().ok().map(|a| (i, a))
        })
    }

    async fn call_json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        // Request bodies may carry plaintext: built in, and sent from, zeroizing memory.
        let body = match body {
            Some(b) => to_json_zeroizing(b, 256)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .into_bytes(),
            None => Bytes::new(),
        };
        let cfg = &self.inner.cfg;
        let n = self.inner.replicas.len();
        let deadline = Instant::now() + cfg.deadline;
        let start = self
            .inner
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % n;
        let mut tried = vec![false; n];
        let mut retry = 0u32;
        let mut waited_for_health = false;
        let mut last: Option<ClientError> = None;
        loop {
            let Some((i, admission)) = self.pick(start, &tried) else {
                // Several replicas, the ones tried in this round failed and the others'
                // circuits are open: one of those may be back (restarted after a kill while
                // another then died), which only a health check can tell. Have them probed
                // now and wait for that once, within the deadline, rather than fail (or retry
                // only the replicas that just failed) while the replica set can still serve.
                let ejected: Vec<&Replica> = (0..n)
                    .filter(|i| !tried[*i])
                    .map(|i| &self.inner.replicas[i])
                    .collect();
                if n > 1
                    && !ejected.is_empty()
                    && !waited_for_health
                    && !cfg.health_interval.is_zero()
                {
                    waited_for_health = true;
                    // A no-op without health checks, whose absence the cooldown covers.
                    ejected.iter().for_each(|r| r.probe_now.notify_one());
                    let until = (Instant::now() + cfg.health_interval + Duration::from_millis(100))
                        .min(deadline);
                    let back = || ejected.iter().any(|r| r.breaker.would_admit());
                    while Instant::now() < until && !back() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if back() {
                        // `tried` keeps the failed ones: the returned replica goes first.
                        continue;
                    }
                }
                // Every replica was tried in this round (or its circuit is open).
                let e = last.take().unwrap_or_else(|| {
                    ClientError::Unavailable(
                        "circuit open: the KMS failed repeatedly; calls fail fast until a probe succeeds"
                            .into(),
                    )
                });
                if !tried.iter().any(|t| *t) || !e.retryable() || retry >= cfg.max_retries {
                    return Err(e);
                }
                let backoff = Duration::from_millis(50u64 << retry.min(6));
                // A retry that could not finish within the deadline is not started.
                if Instant::now() + backoff >= deadline {
                    return Err(e);
                }
                tracing::debug!(path, retry, error = %e, "retrying KMS call");
                tokio::time::sleep(backoff).await;
                retry += 1;
                tried.iter_mut().for_each(|t| *t = false);
                last = Some(e);
                continue;
            };
            tried[i] = true;
            let replica = &self.inner.replicas[i];
            let admitted = Attempt {
                breaker: &replica.breaker,
                admission,
                done: false,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last.unwrap_or_else(|| {
                    ClientError::Unavailable(format!("{path}: deadline passed"))
                }));
            }
            let timeout = cfg.request_timeout.min(left);
            let began = Instant::now();
            let res = self
                .call_once(replica, method.clone(), path, body.clone(), timeout)
                .await;
            admitted.finish(Outcome::of(res.as_ref().err(), began.elapsed(), timeout));
            match res {
                Err(e) if e.retryable() => {
                    if n > 1 {
                        tracing::debug!(path, endpoint = %replica.endpoint, error = %e, "KMS replica failed; trying another");
                    }
                    last = Some(e);
                }
                other => return other,
            }
        }
    }

    async fn call_once<Resp: DeserializeOwned>(
        &self,
        replica: &Replica,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let (status, bytes) = self.raw_once(replica, method, path, body, timeout).await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ClientError::Protocol(format!("bad answer to {path}: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) if b.error.code == ErrorCode::Unavailable => {
                Err(ClientError::Unavailable(b.error.message))
            }
            // Over a limit, the KMS's or this peer's: retry later.
            Ok(b) if matches!(b.error.code, ErrorCode::Overloaded | ErrorCode::RateLimited) => {
                Err(ClientError::Overloaded(b.error.message))
            }
            Ok(b) => Err(ClientError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            }),
            Err(_) if status == StatusCode::SERVICE_UNAVAILABLE => {
                Err(ClientError::Unavailable(format!("{path} answered 503")))
            }
            Err(_) => Err(ClientError::Protocol(format!(
                "{path} answered {status} without an error body"
            ))),
        }
    }
}

/// The body of a batch call, borrowing its items (the shape of [`crate::wire::BatchRequest`]),
/// so a caller keeps them to split and resend after a 413.
#[derive(Serialize)]
struct BatchItems<'a, T> {
    items: &'a [T],
}

fn check_len<T>(n: usize, results: Vec<ItemResult<T>>) -> Result<Vec<ItemResult<T>>, ClientError> {
    if results.len() == n {
        Ok(results)
    } else {
        Err(ClientError::Protocol(format!(
            "batch of {n} items answered with {} results",
            results.len()
        )))
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
