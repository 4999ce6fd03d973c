//! One call's attempts: the replica picked round-robin past open circuits, immediate
//! failover to a replica not tried yet, bounded retries with backoff within the call's
//! deadline, and the answer decoded or mapped to a [`ClientError`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Admission, Attempt, ClientError, KmsClient, Outcome, Replica};
use crate::wire::{to_json_zeroizing, ErrorBody, ErrorCode};

impl KmsClient {
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

    pub(super) async fn call_json<Req: Serialize, Resp: DeserializeOwned>(
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

    pub(super) async fn call_once<Resp: DeserializeOwned>(
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
