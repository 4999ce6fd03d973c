//! Readiness: a real HSM round trip and a store check, made at most once per
//! [`READY_CACHE`] and shared by concurrent callers.

use std::time::Duration;

use crate::backend::{BackendState, KeyBackend};
use crate::keystore::KeyStore;

use super::*;

/// Longest wait for the HSM round trip of a readiness check.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a readiness answer is reused: `/readyz` needs no credentials, so without this any
/// local caller could turn it into HSM load.
pub(super) const READY_CACHE: Duration = Duration::from_secs(1);

/// Result of a readiness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not ready, with a short reason safe to show to callers.
    NotReady(&'static str),
}

impl<B: KeyBackend, S: KeyStore> KeyService<B, S> {
    /// Ready when the backend says so, a real HSM round trip succeeds and the store answers.
    /// The HSM round trip is made at most once per [`READY_CACHE`]; concurrent callers share
    /// it.
    pub async fn readiness(&self) -> Readiness {
        let state = self.backend.state();
        if state != BackendState::Ready {
            return Readiness::NotReady(state.reason());
        }
        let mut last = self.ready.lock().await;
        if let Some((at, r)) = *last {
            if at.elapsed() < READY_CACHE {
                return r;
            }
        }
        let r = self.check_ready().await;
        *last = Some((std::time::Instant::now(), r));
        r
    }

    pub(super) async fn check_ready(&self) -> Readiness {
        match tokio::time::timeout(READY_TIMEOUT, self.backend.health_check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness: HSM round trip failed");
                return Readiness::NotReady("HSM round trip failed");
            }
            Err(_) => {
                tracing::warn!("readiness: HSM round trip timed out");
                return Readiness::NotReady("HSM round trip timed out");
            }
        }
        if let Err(e) = self.store.check().await {
            tracing::warn!(error = %e, "readiness: key store check failed");
            return Readiness::NotReady("key store unavailable");
        }
        Readiness::Ready
    }
}
