//! [`StoreError`]: the one error type of both key stores.

use kms_api::KeyId;

/// Failures of a key store. Messages name keys and paths, never key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened at start-up (`target`: its path, or its database URL
    /// without the password).
    #[error("key store {target}: {detail}")]
    Open { target: String, detail: String },
    /// The store reached its configured size (`limit` names the setting to raise, e.g.
    /// `store.map_size_mb = 64`): nothing was written.
    #[error("key store is full ({limit}); nothing was written")]
    Full { limit: String },
    /// The file system under the store is full (or a quota or file-size limit was hit):
    /// nothing was written; writes work again once space is freed.
    #[error("the key store's file system is full; nothing was written: {0}")]
    NoSpace(String),
    /// A record with this key id already exists (`put_new`).
    #[error("key {0} already exists in the key store")]
    AlreadyExists(KeyId),
    /// No record with this key id (`compare_and_swap`).
    #[error("key {0} is not in the key store")]
    NotFound(KeyId),
    /// The record changed since the caller read it (`compare_and_swap`); nothing was written.
    #[error("key {0} changed concurrently; nothing was written")]
    Conflict(KeyId),
    /// The audit head moved since the appender read it (an append it did not see); nothing
    /// was written.
    #[error("the audit log's head moved; nothing was written")]
    AuditHeadMoved,
    /// A stored record cannot be decoded.
    #[error("key record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    /// Reading or writing failed (I/O, the database unreachable or refusing).
    #[error("key store I/O: {0}")]
    Io(String),
    /// The writer has stopped (shutting down or crashed).
    #[error("key store writer is not running")]
    Closed,
    /// A write fenced by a lease ([`KeyStore::put_job_leased`]) found the lease expired or
    /// held by another: nothing was written.
    ///
    /// [`KeyStore::put_job_leased`]: super::KeyStore::put_job_leased
    #[error("lease {0} is no longer held; nothing was written")]
    LeaseLost(String),
}
