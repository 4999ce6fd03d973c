//! What the service holds for its jobs ([`crate::service::jobs`]): the automatic rotation policy and
//! the jobs this process drives. Apart from the jobs themselves, so that the service holds it
//! without importing the job runner (which drives jobs through the service).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kms_api::admin::JobId;

/// When a thread's key is rotated without being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Rotate once the key has sealed more messages than this.
    pub after_messages: u64,
    /// Rotate once the key is older than this (`None`: never for age).
    pub after_age: Option<Duration>,
    /// Start one only while fewer jobs than this run here (running or being started).
    pub max_running: usize,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            after_messages: 1 << 30,
            after_age: None,
            max_running: 4,
        }
    }
}

/// Jobs this process drives now (so one job never runs twice here), and automatic starts
/// under way (not driven yet).
#[derive(Debug, Default)]
pub struct Running {
    pub(crate) driven: service_kit::jobs::Driven<JobId>,
    starting: Arc<AtomicUsize>,
    /// Orders reservations, so two cannot both take the last slot.
    reserving: Mutex<()>,
}

/// An automatic start's place under [`RotationPolicy::max_running`], held until the job it
/// starts is driven (or the start fails).
#[derive(Debug)]
pub struct StartSlot(Arc<AtomicUsize>);

impl Drop for StartSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Running {
    /// A slot for an automatic start when fewer than `max` jobs are driven or being
    /// started; `None` when the cap is reached.
    pub fn reserve(&self, max: usize) -> Option<StartSlot> {
        let _order = self
            .reserving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Starts first: a start that has handed its job over was counted as driven before its
        // slot was released, so reading in this order never misses a job.
        let starting = self.starting.load(Ordering::Acquire);
        if starting + self.driven.len() >= max {
            return None;
        }
        self.starting.fetch_add(1, Ordering::AcqRel);
        Some(StartSlot(Arc::clone(&self.starting)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn automatic_starts_stop_at_the_cap_of_jobs_running_or_starting() {
        let r = Running::default();
        let a = JobId::from_random([1; 8]);
        let (end_a, a_ends) = tokio::sync::oneshot::channel::<()>();
        assert!(r.driven.start(&a, async move {
            let _ = a_ends.await;
        }));
        let slot = r.reserve(2).expect("one job running, cap 2");
        assert!(r.reserve(2).is_none(), "one running and one starting");
        drop(slot);
        let slot = r.reserve(2).expect("the start finished");
        // A start that hands its job to the driver keeps the count: driven, then released.
        let b = JobId::from_random([2; 8]);
        let (_end_b, b_ends) = tokio::sync::oneshot::channel::<()>();
        assert!(r.driven.start(&b, async move {
            let _ = b_ends.await;
        }));
        drop(slot);
        assert!(r.reserve(2).is_none(), "two driven");
        end_a.send(()).unwrap();
        while r.driven.contains(&a) {
            tokio::task::yield_now().await;
        }
        assert!(r.reserve(2).is_some());
    }
}
