//! Process-wide alerts: conditions an operator must see because they weaken a guarantee
//! while the service still runs (one uid for server and admin, core dumps not denied, keys in
//! unlocked memory). Each is raised once, logged at `warn` with an `alert` field, and then
//! reported by the service's `/readyz` body and (the KMS) by `status`, for as long as the
//! process lives.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// One alert. Its [`Alert::as_str`] name is stable: monitoring matches on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alert {
    /// `listen.single_user = true`: the server's uid may also use the KMS's admin API.
    SingleUser,
    /// The process could not deny core dumps: key material could reach a core file.
    CoreDumpsNotDenied,
    /// The key arena could not be locked into RAM: DEKs may reach swap.
    KeyMemoryUnlocked,
}

impl Alert {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Alert::SingleUser => "single_user",
            Alert::CoreDumpsNotDenied => "core_dumps_not_denied",
            Alert::KeyMemoryUnlocked => "key_memory_unlocked",
        }
    }
}

static RAISED: Mutex<BTreeSet<Alert>> = Mutex::new(BTreeSet::new());

fn raised() -> std::sync::MutexGuard<'static, BTreeSet<Alert>> {
    // A set of plain values: a panic elsewhere cannot leave it half-written.
    RAISED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Raises `alert` (once; later calls change nothing) and logs `why` with it.
pub fn raise(alert: Alert, why: &str) {
    if raised().insert(alert) {
        tracing::warn!(alert = alert.as_str(), "{why}");
    }
}

/// The alerts raised so far, by name, in a stable order.
pub fn current() -> Vec<String> {
    raised().iter().map(|a| a.as_str().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_is_reported_once_by_its_stable_name() {
        raise(Alert::SingleUser, "test");
        raise(Alert::SingleUser, "test again");
        let now = current();
        assert_eq!(now.iter().filter(|a| *a == "single_user").count(), 1);
        assert!(!now.contains(&"core_dumps_not_denied".to_owned()));
    }
}
