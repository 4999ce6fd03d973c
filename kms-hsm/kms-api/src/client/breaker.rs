//! The circuit breaker of each replica ([`BreakerConfig`]): closed, open (calls fail at once)
//! or probing, moved by the outcome of each attempt and by the health checks.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::*;

/// When the client stops calling a KMS that keeps failing.
///
/// An attempt that timed out (a hung KMS: stopped, swapping, wedged in its HSM) opens the
/// circuit at once, so a hung KMS costs one call its deadline and the next calls fail at
/// once. Other failures (refused connections, `503 unavailable`) open it after `failures` in
/// a row. While [`KmsClient::spawn_health_checks`] runs, only its `/readyz` probes close an
/// open circuit, so no caller's request is ever the probe that waits out a hung KMS;
/// without it, the first call after `cooldown` is let through as the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed attempts that open the circuit; 0 never opens it.
    pub failures: u32,
    /// How long an open circuit fails calls at once before a probe is let through.
    pub cooldown: Duration,
}

/// How an attempt ended, as the circuit breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Answered (whatever the answer: the KMS is up).
    Answered,
    /// Unreachable or `503 unavailable`.
    Failed,
    /// No answer within the attempt's timeout of at least [`HUNG_AFTER`].
    Hung,
}

/// An attempt that waited at least this long and timed out is a hung KMS (shorter waits are
/// a caller's deadline nearly spent, which says nothing about the KMS).
pub(super) const HUNG_AFTER: Duration = Duration::from_millis(200);

impl Outcome {
    /// How the breaker counts an attempt that ended with `error` (none: answered) after
    /// `waited`, its timeout being `timeout`. An attempt that used up a timeout of at least
    /// [`HUNG_AFTER`] timed out: nothing else ends an attempt that late.
    pub(super) fn of(error: Option<&ClientError>, waited: Duration, timeout: Duration) -> Self {
        match error {
            Some(e) if e.counts_as_failure() => {
                if timeout >= HUNG_AFTER && waited >= timeout {
                    Outcome::Hung
                } else {
                    Outcome::Failed
                }
            }
            _ => Outcome::Answered,
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(2),
        }
    }
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Circuit {
    /// Calls go through; `failures` consecutive attempts have failed.
    Closed { failures: u32 },
    /// Calls fail at once until `until`.
    Open { until: Instant },
    /// One probe is out; other calls fail at once until it ends.
    Probing,
}

/// How a call was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Normal,
    Probe,
}

/// The circuit breaker ([`BreakerConfig`]).
#[derive(Debug)]
pub(super) struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<Circuit>,
    /// Set once background health checks run: then they alone close an open circuit.
    pub(super) probed_in_background: std::sync::atomic::AtomicBool,
}

impl Breaker {
    pub(super) fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(Circuit::Closed { failures: 0 }),
            probed_in_background: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn background(&self) -> bool {
        self.probed_in_background
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Circuit> {
        // The state is a plain value: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a call through, or fails it at once while the circuit is open.
    pub(super) fn admit(&self) -> Result<Admission, ClientError> {
        let mut s = self.lock();
        match *s {
            Circuit::Closed { .. } => Ok(Admission::Normal),
            Circuit::Open { until } if Instant::now() >= until && !self.background() => {
                *s = Circuit::Probing;
                Ok(Admission::Probe)
            }
            Circuit::Open { .. } | Circuit::Probing => Err(ClientError::Unavailable(
                "circuit open: the KMS failed repeatedly; calls fail fast until a probe succeeds"
                    .into(),
            )),
        }
    }

    /// Records the outcome of an attempt: an answer closes the circuit, a hang opens it, a
    /// failure moves it towards open (or back to open after a probe).
    pub(super) fn record(&self, admission: Admission, outcome: Outcome) {
        if self.cfg.failures == 0 {
            return;
        }
        let mut s = self.lock();
        let before = *s;
        let open = Circuit::Open {
            until: Instant::now() + self.cfg.cooldown,
        };
        *s = match (outcome, admission, before) {
            (Outcome::Answered, _, _) => Circuit::Closed { failures: 0 },
            (_, Admission::Probe, _) | (_, _, Circuit::Probing) => open,
            (Outcome::Hung, Admission::Normal, Circuit::Closed { .. }) => open,
            (Outcome::Failed, Admission::Normal, Circuit::Closed { failures }) => {
                let failures = failures.saturating_add(1);
                if failures >= self.cfg.failures {
                    open
                } else {
                    Circuit::Closed { failures }
                }
            }
            (Outcome::Failed | Outcome::Hung, Admission::Normal, was @ Circuit::Open { .. }) => was,
        };
        match (before, *s) {
            (Circuit::Closed { .. }, Circuit::Open { .. }) => tracing::warn!(
                ?outcome,
                failures = self.cfg.failures,
                cooldown_ms = self.cfg.cooldown.as_millis() as u64,
                "KMS circuit opened: calls fail fast until a probe succeeds"
            ),
            (Circuit::Probing | Circuit::Open { .. }, Circuit::Closed { .. }) => {
                tracing::info!("KMS circuit closed: the KMS answers again")
            }
            _ => {}
        }
    }

    /// Whether [`Breaker::admit`] would let a call through now (without taking the probe).
    pub(super) fn would_admit(&self) -> bool {
        match *self.lock() {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } => Instant::now() >= until && !self.background(),
            Circuit::Probing => false,
        }
    }

    /// A probe that ended without an outcome (its call was cancelled): the next call probes.
    pub(super) fn abandon(&self, admission: Admission) {
        if admission == Admission::Probe {
            let mut s = self.lock();
            if *s == Circuit::Probing {
                *s = Circuit::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

/// Ends an admitted attempt: records its outcome, or, if dropped without one (the caller's
/// future was cancelled), gives the probe back.
pub(super) struct Attempt<'a> {
    pub(super) breaker: &'a Breaker,
    pub(super) admission: Admission,
    pub(super) done: bool,
}

impl Attempt<'_> {
    pub(super) fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.record(self.admission, outcome);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.abandon(self.admission);
        }
    }
}

/// Held by the health-check task: when it ends, calls probe an open circuit again.
pub(super) struct BackgroundProbes(pub(super) std::sync::Weak<Inner>);

impl Drop for BackgroundProbes {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            for r in &inner.replicas {
                r.breaker
                    .probed_in_background
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}
