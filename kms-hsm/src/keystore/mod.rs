//! Durable records of the DEKs the KMS has created (key id → wrapped DEK, KEK id and version,
//! thread id, creation time and state), and of the key lifecycle: what happened to each KEK
//! version and the lifecycle jobs with their progress.
//!
//! [`KeyStore`] is the boundary, with two implementations: [`lmdb::LmdbStore`] (embedded,
//! one host, the default) and [`postgres::PostgresStore`] (shared by several KMS replicas);
//! [`AnyStore`] is the one the KMS runs on, picked by `store.backend`. A store promises:
//! * a write returns only once it is durable (committed and synced);
//! * writes are linearizable per key (one writer);
//! * it never holds raw key material: records carry the *wrapped* DEK only, and a destroyed
//!   record keeps no wrapped DEK at all (crypto-shredding).

mod any;
mod codec;
mod error;
mod records;
mod store;

pub mod lmdb;
pub mod postgres;

pub use any::AnyStore;
pub(crate) use codec::{
    decode_record, encode_audit_entries, encode_record, entry_has_mac, pending_audit_key,
};
pub use error::StoreError;
pub use records::{
    AuditAnchor, AuditHead, Compacted, JobRecord, KekState, KekVersionRecord, KeyRecord, KeyState,
    PendingAudit,
};
pub use store::{AuditLock, Change, ChangePage, Commit, DestroyOutcome, KeyStore, LeaseOutcome};

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
