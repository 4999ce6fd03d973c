//! `progressdb backup-check`: which threads a server backup and a KMS backup, restored
//! together, would leave unreadable. The KMS backup is read as it is (its HMAC can only be
//! verified in the HSM, which `progressdb-kms restore` does); only what it says about each
//! key is used: whether it holds the key, whether it is destroyed, and whether the KEK
//! version it is wrapped under still exists.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::*;

/// Why a thread would be unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The KMS backup does not hold the key (made before it, or from another KMS).
    KeyMissing,
    /// The key was destroyed (the thread was deleted) before the KMS backup.
    KeyDestroyed,
    /// The key's KEK version is destroyed (or absent) in the KMS backup.
    KekVersionGone,
}

/// One thread that would not read, and the key that fails it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreadable {
    pub thread: kms_api::ThreadId,
    pub key_id: kms_api::KeyId,
    pub reason: Reason,
}

/// The outcome for every thread of the server backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairReport {
    pub threads: u64,
    pub readable: u64,
    /// Threads stored without encryption (readable without any key).
    pub plain: u64,
    pub unreadable: Vec<Unreadable>,
}

#[derive(Deserialize)]
struct KmsBackup {
    format: String,
    kek_versions: Vec<KekVersion>,
    records: Vec<KeyRecord>,
}

#[derive(Deserialize)]
struct KekVersion {
    version: kms_api::KekVersion,
    state: String,
}

#[derive(Deserialize)]
struct KeyRecord {
    key_id: kms_api::KeyId,
    kek_version: kms_api::KekVersion,
    state: String,
}

/// Checks every thread of `manifest` against the KMS backup `kms` (its JSON text).
///
/// # Errors
/// [`BackupError::Invalid`] when `kms` is not a `progressdb-kms` backup.
pub fn check(manifest: &Manifest, kms: &[u8]) -> Result<PairReport, BackupError> {
    let b: KmsBackup = serde_json::from_slice(kms).map_err(|e| {
        BackupError::Invalid(format!(
            "the KMS backup does not parse ({})",
            crate::store::scan_error_text(&e)
        ))
    })?;
    if !b.format.starts_with("progressdb-kms-backup/") {
        return Err(BackupError::Invalid(
            "not a progressdb-kms backup (format)".into(),
        ));
    }
    let live_keks: Vec<kms_api::KekVersion> = b
        .kek_versions
        .iter()
        .filter(|k| k.state != "destroyed")
        .map(|k| k.version)
        .collect();
    let keys: HashMap<&kms_api::KeyId, &KeyRecord> =
        b.records.iter().map(|r| (&r.key_id, r)).collect();
    let mut report = PairReport {
        threads: manifest.summary.thread_keys.len() as u64,
        readable: 0,
        plain: 0,
        unreadable: Vec::new(),
    };
    for t in &manifest.summary.thread_keys {
        let needed: Vec<&KeyRef> = t.key.iter().chain(t.retiring.iter()).collect();
        if needed.is_empty() {
            report.plain += 1;
            continue;
        }
        let failure = needed.iter().find_map(|k| {
            let reason = match keys.get(&k.key_id) {
                None => Reason::KeyMissing,
                Some(r) if r.state == "destroyed" => Reason::KeyDestroyed,
                Some(r) if !live_keks.contains(&r.kek_version) => Reason::KekVersionGone,
                Some(_) => return None,
            };
            Some(Unreadable {
                thread: t.thread.clone(),
                key_id: k.key_id.clone(),
                reason,
            })
        });
        match failure {
            Some(u) => report.unreadable.push(u),
            None => report.readable += 1,
        }
    }
    Ok(report)
}
