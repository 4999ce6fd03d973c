//! The signature policy of frontend callers: which forms of `X-User-Signature` are accepted,
//! their longest lifetime, and the per-user generations that revoke all earlier signatures.

use super::*;

/// Which forms of `X-User-Signature` are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureForms {
    /// Plain (never expiring) and expiring signatures.
    PlainAndExpiring,
    /// Expiring signatures only (`auth.require_expiring_signatures = true`).
    ExpiringOnly,
}

/// How user signatures are made and accepted (`[auth]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignaturePolicy {
    pub forms: SignatureForms,
    /// The longest lifetime an expiring signature may have: `POST /v1/sign` grants no more,
    /// and one that expires further away than this from now is refused.
    pub max_ttl_secs: u64,
}

impl Default for SignaturePolicy {
    fn default() -> Self {
        Self {
            forms: SignatureForms::PlainAndExpiring,
            max_ttl_secs: DEFAULT_SIGNATURE_TTL_SECS,
        }
    }
}

/// A user's signature generation: how many times its signatures were revoked. Every
/// signature binds it (from 1 on), so a revocation invalidates all earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct SignatureGeneration(pub u64);

/// The users whose signatures were revoked, with their generation; everyone else is at
/// generation 0. Loaded from the store at start and kept in step with it by revocations
/// (the store is written first).
#[derive(Debug, Default)]
pub struct SignatureGenerations {
    revoked: std::sync::RwLock<std::collections::HashMap<UserId, u64>>,
}

impl SignatureGenerations {
    pub fn new(from_store: impl IntoIterator<Item = (UserId, u64)>) -> Self {
        Self {
            revoked: std::sync::RwLock::new(from_store.into_iter().collect()),
        }
    }

    /// `user`'s generation now.
    pub fn of(&self, user: &UserId) -> SignatureGeneration {
        let map = self
            .revoked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        SignatureGeneration(map.get(user).copied().unwrap_or(0))
    }

    /// Records `user`'s new generation (after the store has it). Generations only go up:
    /// two revocations answered in the other order than they committed keep the higher.
    pub fn set(&self, user: &UserId, generation: SignatureGeneration) {
        let mut map = self
            .revoked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let g = map.entry(user.clone()).or_insert(0);
        *g = (*g).max(generation.0);
    }
}

/// Domain tag of the expiring signature form.
pub(super) const SIG_V2_TAG: &[u8] = b"progressdb-user-sig:v2";
/// Prefix of an expiring signature in `X-User-Signature`.
pub(super) const SIG_V2_PREFIX: &str = "v2.";
/// The default of `auth.max_signature_ttl_secs` (12 hours).
pub const DEFAULT_SIGNATURE_TTL_SECS: u64 = 12 * 3600;
/// The largest `auth.max_signature_ttl_secs` accepted (7 days): signatures are bearer
/// credentials, and their lifetime is what a leak costs.
pub const MAX_SIGNATURE_TTL_SECS: u64 = 7 * 24 * 3600;
/// Clock difference tolerated between the signer and this server, added to the TTL cap.
pub(super) const CLOCK_SKEW_SECS: u64 = 60;
