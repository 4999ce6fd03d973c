//! The skeleton of both services' resumable jobs (the KMS's KEK rotations and verifications,
//! the server's DEK rotations and thread encryptions), written once: what a step can run
//! into ([`StepError`]), the pause between retries ([`Backoff`]), and the set of jobs this
//! process drives, one task per job ([`Driven`]). What a step does, how its progress is
//! persisted, and (in the KMS) the lease that fences it across replicas stay with each job.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// What a step of a job ran into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// Something it needs cannot serve now (the HSM, the KMS, the store): the step is retried
    /// after a [`Backoff`] pause, the job's recorded state unchanged.
    Pause(String),
    /// The job cannot go on: it ends `failed` with this reason.
    Fail(String),
}

/// The pause before a paused job's next try: 200 ms, doubling up to 10 s, and back to 200 ms
/// once a step succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Self(Self::FIRST)
    }

    /// A step succeeded.
    pub fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    /// The pause to take now (the next one is twice as long, up to [`Backoff::MAX`]).
    pub fn next_pause(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        now
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// The jobs this process drives, one task each: a job is never driven twice at once here.
/// A finished task's entry is dropped at the next start, so the set stays as small as the
/// number of jobs under way. Dropping the set aborts its tasks (a shutdown: what they did is
/// persisted, and the next start resumes them).
#[derive(Debug)]
pub struct Driven<K> {
    tasks: Mutex<BTreeMap<K, tokio::task::JoinHandle<()>>>,
}

impl<K> Default for Driven<K> {
    fn default() -> Self {
        Self {
            tasks: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<K: Ord + Clone> Driven<K> {
    /// Whether job `id` is being driven now.
    pub fn contains(&self, id: &K) -> bool {
        self.lock().get(id).is_some_and(|t| !t.is_finished())
    }

    /// How many jobs are being driven now.
    pub fn len(&self) -> usize {
        self.lock().values().filter(|t| !t.is_finished()).count()
    }

    /// Whether no job is being driven.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drives job `id` with `drive` on a task of its own, unless it is driven already (then
    /// `drive` is dropped unstarted). Returns whether a task was started. Must run inside a
    /// Tokio runtime.
    pub fn start<F>(&self, id: &K, drive: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut tasks = self.lock();
        tasks.retain(|_, t| !t.is_finished());
        if tasks.contains_key(id) {
            return false;
        }
        tasks.insert(id.clone(), tokio::spawn(drive));
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<K, tokio::task::JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K> Drop for Driven<K> {
    fn drop(&mut self) {
        let tasks = std::mem::take(self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner));
        for task in tasks.into_values() {
            task.abort();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let pauses: Vec<_> = (0..8).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        b.reset();
        assert_eq!(b.next_pause(), Backoff::FIRST);
    }

    #[tokio::test]
    async fn a_job_is_driven_once_at_a_time_and_again_after_it_ends() {
        let driven = Driven::<u32>::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        assert!(driven.start(&1, async move {
            let _ = rx.await;
        }));
        assert!(
            !driven.start(&1, async {}),
            "a second driver of the same job"
        );
        assert!(driven.contains(&1));
        assert!(driven.start(&2, async {}));
        tx.send(()).unwrap();
        while driven.contains(&1) {
            tokio::task::yield_now().await;
        }
        assert!(
            driven.start(&1, async {}),
            "driven again once its task ended"
        );
    }
}
