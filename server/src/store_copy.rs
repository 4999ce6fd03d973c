//! `progressdb store copy`: moves the server's whole store between LMDB and PostgreSQL (to
//! PostgreSQL when the messages should outlive one disk, and back), then proves the copy is
//! the same.
//!
//! What is copied: every key and value as stored (thread records with their wrapped DEKs,
//! message ciphertext, tombstones, the author index, jobs, signature generations). Nothing
//! is decrypted: the KMS is not needed, and the copy holds exactly what the source held.
//!
//! Rules, all fail-closed:
//! * the target must be empty: a copy never merges into or overwrites a live store;
//! * the source must be quiescent: an LMDB store is opened with its exclusive lock, a
//!   PostgreSQL one with the one-server lock (both refused while a server runs on it);
//! * afterwards both stores are read again in full and compared: the number of pairs, their
//!   bytes and a SHA-256 over every key and value in key order. A difference is an error.

use std::time::Duration;

use ring::digest::{Context, SHA256};
use serde::Serialize;
use service_kit::store_spec::StoreSpec;

use crate::config::Config;
use crate::metrics::StoreMetrics;
use crate::store::{RawPuts, Store, StoreError, StoreOptions};

/// Pairs read (and written, in one transaction) at a time.
const PAGE: usize = 512;

/// Why a copy was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A store cannot be opened (in use, missing, unreachable).
    #[error("{0}")]
    Open(String),
    /// The target holds data already: nothing was written.
    #[error("the target store is not empty; copy only into a new, empty store")]
    TargetNotEmpty,
    /// The copy, read back, differs from the source.
    #[error("the copy does not match the source: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was copied and verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub pairs: u64,
    pub bytes: u64,
    pub threads: u64,
    pub messages: u64,
    /// SHA-256 of every key and value, in key order, each preceded by its length.
    pub sha256: String,
    /// Both stores were read again in full and found equal.
    pub verified: bool,
}

/// Pairs, bytes and digest of everything `store` holds.
async fn summary(store: &Store) -> Result<(u64, u64, String), StoreError> {
    let mut ctx = Context::new(&SHA256);
    let (mut pairs, mut bytes) = (0u64, 0u64);
    let mut after = None;
    loop {
        let page = store.raw_pairs(after.take(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (k, v) in &page {
            for part in [k, v] {
                ctx.update(&(part.len() as u64).to_be_bytes());
                ctx.update(part);
                bytes += part.len() as u64;
            }
            pairs += 1;
        }
    }
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((pairs, bytes, hex))
}

/// Copies everything in `from` into the empty `to`, then verifies the copy.
///
/// # Errors
/// `TargetNotEmpty` (nothing written); `Store` for a read or write that failed (the target is
/// then partial: drop it and copy again); `Mismatch` after a copy that does not read back
/// equal.
pub async fn copy(from: &Store, to: &Store) -> Result<CopyReport, CopyError> {
    if !to.raw_pairs(None, 1).await?.is_empty() {
        return Err(CopyError::TargetNotEmpty);
    }
    let mut after = None;
    loop {
        let page = from.raw_pairs(after.take(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        to.write(RawPuts(page)).await?;
    }
    let source = summary(from).await?;
    let target = summary(to).await?;
    if source != target {
        return Err(CopyError::Mismatch(format!(
            "source {} pairs, {} bytes, sha256 {}; copy {} pairs, {} bytes, sha256 {}",
            source.0, source.1, source.2, target.0, target.1, target.2
        )));
    }
    let (threads, messages) = to.stats().await?;
    Ok(CopyReport {
        pairs: source.0,
        bytes: source.1,
        threads,
        messages,
        sha256: source.2,
        verified: true,
    })
}

/// Which side of a copy a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

/// Opens one side of a copy (`spec`), with the settings of `cfg`'s `[store]` where they
/// apply: the map sizes for LMDB; the password file, CA file and timeout for PostgreSQL when
/// `cfg` is a PostgreSQL config (else `PGPASSWORD` and no TLS: a Unix socket or a loopback
/// `sslmode=disable`). An LMDB source must exist.
///
/// # Errors
/// [`CopyError::Open`] naming the store.
pub async fn open_side(cfg: &Config, spec: &StoreSpec, side: Side) -> Result<Store, CopyError> {
    match spec {
        StoreSpec::Lmdb(path) => {
            if side == Side::Source && !path.join("data.mdb").exists() {
                return Err(CopyError::Open(format!(
                    "{}: no LMDB message store here",
                    path.display()
                )));
            }
            let mut opts =
                StoreOptions::new(path, cfg.store.map_size_mb, cfg.store.max_map_size_mb);
            opts.max_batch_ops = cfg.store.max_batch_ops;
            tokio::task::spawn_blocking(move || Store::open(&opts, StoreMetrics::default()))
                .await
                .map_err(|e| CopyError::Open(e.to_string()))?
                .map_err(|e| CopyError::Open(e.to_string()))
        }
        StoreSpec::Postgres(url) => {
            let pg = cfg.store.postgres().ok().flatten();
            let pg = service_kit::postgres::PostgresConfig::new(
                url.clone(),
                pg.as_ref().and_then(|p| p.password_file.clone()),
                pg.as_ref().and_then(|p| p.ca_file.clone()),
                4,
                pg.as_ref()
                    .map_or(Duration::from_secs(cfg.store.timeout_secs), |p| p.timeout),
                Duration::from_millis(500),
            )
            .map_err(|e| CopyError::Open(e.to_string()))?;
            Store::open_postgres(&pg, cfg.store.max_batch_ops, StoreMetrics::default())
                .await
                .map_err(|e| CopyError::Open(e.to_string()))
        }
    }
}
