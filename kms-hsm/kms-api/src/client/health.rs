//! The background health check: each replica's `/readyz` probed on its own schedule, so a
//! failing one is ejected (its circuit opens) before calls find it and a recovered one is
//! taken back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};

use super::{Admission, BackgroundProbes, ClientError, Inner, KmsClient, Outcome, MIN_PROBE_GAP};

impl KmsClient {
    /// Starts the background health check: every [`KmsClientConfig::health_interval`], each
    /// replica's `/readyz` is probed (past its circuit); a failure counts against it like a
    /// failed call, a success closes its circuit. From then on only these probes close an open
    /// circuit: calls never wait as the half-open probe ([`BreakerConfig`]). With several
    /// replicas it also ejects a dead one before calls find it, and a call that finds every
    /// circuit open has the open ones probed at once. Each replica is probed on its own
    /// schedule, so a hung one (whose probe waits out its timeout) delays no other's. Stops
    /// when every clone of the client is gone. Must run inside a tokio runtime.
    ///
    /// [`KmsClientConfig::health_interval`]: super::KmsClientConfig::health_interval
    /// [`BreakerConfig`]: super::BreakerConfig
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
    pub(super) async fn probe(&self, i: usize) -> Result<(), ClientError> {
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
}
