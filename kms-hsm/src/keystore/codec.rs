//! The stored encodings both backends share: key records and audit entries as JSON, and the
//! keys pending audit entries are stored under.

use super::{KeyRecord, StoreError};

/// Decodes the stored JSON of the record under `key`, refusing one that holds another key id
/// (a record planted or moved under the wrong key). Both backends store this encoding.
///
/// # Errors
/// `Corrupt`.
pub(crate) fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    let rec: KeyRecord = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        detail: format!(
            "undecodable record at line {} column {}",
            e.line(),
            e.column()
        ),
    })?;
    if rec.key_id.as_str() != key {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            detail: "record holds another key id".into(),
        });
    }
    Ok(rec)
}

/// The stored JSON of `rec`.
///
/// # Errors
/// `Io` (never seen: every field encodes).
pub(crate) fn encode_record(rec: &KeyRecord) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(rec).map_err(|e| StoreError::Io(format!("cannot encode record: {e}")))
}

/// Whether the stored audit entry `bytes` has MAC `mac` (both backends check the entry a
/// compaction ends at).
pub(crate) fn entry_has_mac(bytes: &[u8], mac: &[u8; 32]) -> bool {
    serde_json::from_slice::<kms_api::admin::AuditEntry>(bytes)
        .ok()
        .and_then(|e| hex::decode(e.mac).ok())
        .is_some_and(|m| m == mac)
}

/// The stored JSON of each audit entry, with its sequence number (both backends).
///
/// # Errors
/// `Io` (never seen: every field encodes).
pub(crate) fn encode_audit_entries(
    entries: &[kms_api::admin::AuditEntry],
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    entries
        .iter()
        .map(|e| {
            serde_json::to_vec(e)
                .map(|v| (e.seq, v))
                .map_err(|e| StoreError::Io(format!("cannot encode an audit entry: {e}")))
        })
        .collect()
}

/// The key a pending audit entry is stored under: its time first, so pending entries list
/// oldest first, then a random suffix (both backends).
pub(crate) fn pending_audit_key(entry: &kms_api::admin::AuditEntry) -> String {
    format!(
        "audit-pending/{:020}-{:016x}",
        entry.at,
        rand::random::<u64>()
    )
}
