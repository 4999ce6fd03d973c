//! The records a key store holds: DEK records and their state, KEK-version records, job
//! records, and the audit log's head and anchor.

use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use serde::{Deserialize, Serialize};

/// One DEK's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: KeyId,
    pub kek_id: KekId,
    /// The KEK version the DEK is (or was, when destroyed) wrapped under.
    pub kek_version: KekVersion,
    pub thread_id: ThreadId,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(flatten)]
    pub state: KeyState,
}

/// Lifecycle state of a DEK. An active key has its wrapped form; a destroyed key has none,
/// so no one (not even the HSM) can recover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    Active {
        wrapped: WrappedDek,
    },
    Destroyed {
        /// Seconds since the Unix epoch.
        destroyed_at: u64,
    },
}

impl KeyRecord {
    /// The wrapped DEK of an active key.
    pub fn wrapped(&self) -> Option<&WrappedDek> {
        match &self.state {
            KeyState::Active { wrapped } => Some(wrapped),
            KeyState::Destroyed { .. } => None,
        }
    }
}

/// What the KMS did with a KEK version (the key itself lives in the HSM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KekState {
    /// Usable: the current version, or an older one that records may still depend on.
    Active,
    /// A rotation moved every DEK off it and verified them; it only stays for old backups
    /// until `kek destroy` removes it from the HSM.
    Retired,
    /// Removed from the HSM; nothing can be unwrapped under it any more.
    Destroyed,
}

/// The store's record of one KEK version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekVersionRecord {
    pub version: KekVersion,
    pub state: KekState,
    /// Seconds since the Unix epoch; 0 when the version predates these records.
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<u64>,
}

/// A lifecycle job's record (see [`crate::lifecycle`]): the admin API's [`kms_api::admin::Job`]
/// as it is, persisted after every step, so a restarted KMS resumes it where it stopped.
pub type JobRecord = kms_api::admin::Job;

/// The last audit entry: its sequence number and MAC. Written in the same transaction as the
/// entries, so a log shorter than its head was cut after the fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    #[serde(with = "hex_mac")]
    pub mac: [u8; 32],
}

/// Where the stored audit log begins once a prefix of it was archived and removed
/// ([`KeyStore::compact_audit`]): the last removed entry's sequence number and MAC, and a seal
/// over both made in the HSM under the audit key ([`crate::audit_archive::seal`]), so that
/// no store writer can move the anchor (to hide entries) or make one up.
///
/// [`KeyStore::compact_audit`]: super::KeyStore::compact_audit
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchor {
    pub seq: u64,
    #[serde(with = "hex_mac")]
    pub mac: [u8; 32],
    #[serde(with = "hex_mac")]
    pub seal: [u8; 32],
}

/// What a compaction removed ([`KeyStore::compact_audit`]).
///
/// [`KeyStore::compact_audit`]: super::KeyStore::compact_audit
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compacted {
    /// Audit entries.
    pub entries: u64,
    /// Key records of destroyed keys (tombstones).
    pub tombstones: u64,
}

mod hex_mac {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(m: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(m))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(s).map_err(serde::de::Error::custom)?;
        <[u8; 32]>::try_from(v.as_slice()).map_err(|_| serde::de::Error::custom("32 bytes"))
    }
}

/// A pending audit entry's key and, when it decodes, the entry.
pub type PendingAudit = (String, Option<kms_api::admin::AuditEntry>);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn record_json_shape() {
        let r = KeyRecord {
            key_id: KeyId::from_random([1; 16]),
            kek_id: KekId::parse("kek").unwrap(),
            kek_version: KekVersion::FIRST,
            thread_id: ThreadId::parse("t1").unwrap(),
            created_at: 5,
            state: KeyState::Active {
                wrapped: WrappedDek::new(vec![1, 2, 3]),
            },
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["state"], "active");
        assert_eq!(j["wrapped"], "AQID");
        assert_eq!(j["kek_version"], 1);
        let back: KeyRecord = serde_json::from_value(j).unwrap();
        assert_eq!(back, r);
        let d = KeyRecord {
            state: KeyState::Destroyed { destroyed_at: 9 },
            ..r
        };
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["state"], "destroyed");
        assert!(j.get("wrapped").is_none());
        assert!(!format!("{d:?}").contains("AQID"));
    }
}
