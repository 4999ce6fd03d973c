//! The admin API of the KMS: KEK rotation, lifecycle jobs, status and verification. Served
//! only on the admin endpoint (the admin Unix socket, or TCP with an admin client
//! certificate); the client endpoint answers every `/admin/...` path with 403 `forbidden`.
//!
//! | method, path | body | answer |
//! |---|---|---|
//! | `GET /admin/status` | | [`StatusResponse`] |
//! | `POST /admin/kek/rotate` | | 202 [`StartJobResponse`]: the rotation job (a running one is returned, not doubled) |
//! | `POST /admin/kek/destroy` | [`DestroyKekRequest`] | [`DestroyKekResponse`]; 409 `kek_not_retired` / `kek_in_use` |
//! | `POST /admin/verify` | | 202 [`StartJobResponse`]: a verification job |
//! | `GET /admin/jobs` | | [`JobsResponse`] |
//! | `GET /admin/jobs/{id}` | | [`Job`]; 404 `unknown_job` |
//! | `GET /admin/audit?after=&limit=` | | [`AuditListResponse`]: entries after seq `after` (default 0), at most `limit` (default 100, max 1000) |
//! | `POST /admin/audit/compact` | [`AuditCompactRequest`] | [`AuditCompactResponse`]; 409 `archive_mismatch` |
//! | `POST /admin/audit/verify` | | [`AuditVerifyResponse`] |
//! | `POST /admin/import-copies` | [`ImportCopiesRequest`] (the server's thread key copies) | [`ImportReport`] |
//! | `GET /admin/backup` | | the backup file (JSON, integrity-protected by an HMAC made in the HSM) |
//! | `POST /admin/restore?resurrect=KEY_ID&...` | the backup file | [`RestoreReport`]; 422 `backup_invalid` |

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::ids::{KekId, KekVersion, KeyId};

/// Id of a lifecycle job: `job-` and 16 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

/// A job id that is not `job-` and 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a job id is `job-` followed by 16 lowercase hex digits")]
pub struct JobIdError;

impl JobId {
    /// A new id from 8 random bytes.
    pub fn from_random(bytes: [u8; 8]) -> Self {
        Self(format!("job-{}", hex::encode(bytes)))
    }

    /// # Errors
    /// [`JobIdError`] unless `s` is `job-` and 16 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, JobIdError> {
        match s.strip_prefix("job-") {
            Some(h)
                if h.len() == 16 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(Self(s.to_owned()))
            }
            _ => Err(JobIdError),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a job does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobKind {
    /// KEK rotation: make `target` (a new KEK version) current, rewrap every DEK under older
    /// versions to it, verify every DEK, then mark the older versions retired.
    RotateKek { target: KekVersion },
    /// Unwrap every active DEK under its KEK and count them per KEK version; changes nothing.
    Verify,
}

impl JobKind {
    pub fn label(&self) -> &'static str {
        match self {
            JobKind::RotateKek { .. } => "rotate_kek",
            JobKind::Verify => "verify",
        }
    }
}

/// Where a job is. `succeeded` and `failed` are final; every other state resumes after a
/// restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Rotation: generating the new KEK version in the HSM.
    CreatingKek,
    /// Rotation: rewrapping DEKs under older versions, in key-id order from the cursor.
    Rewrapping,
    /// Unwrapping every active DEK under the current KEK (rotation), or under its own
    /// (verify).
    Verifying,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// Counters of a job. Key ids in `failed_keys` are the first few that failed (at most 20).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Key records in the store when the current phase started (for a progress bar).
    pub total: u64,
    /// Records the current phase has looked at.
    pub scanned: u64,
    /// DEKs rewrapped under the new KEK version.
    pub rewrapped: u64,
    /// DEKs already under the current version when reached.
    pub already_current: u64,
    /// Destroyed keys passed over (they have nothing to rewrap).
    pub destroyed: u64,
    /// DEKs unwrapped successfully in the verification phase.
    pub verified: u64,
    /// DEKs that failed (did not unwrap, or could not be rewrapped).
    pub failed: u64,
    /// Rewrap passes made (a DEK created under the old version while the first pass ran is
    /// caught by verification and rewrapped by another pass).
    pub passes: u32,
    /// Active DEKs per KEK version seen by the verification phase.
    #[serde(default)]
    pub per_version: BTreeMap<u32, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_keys: Vec<KeyId>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A job as stored and as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub state: JobState,
    /// The last key id the current phase finished; phases walk key ids in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<KeyId>,
    pub progress: JobProgress,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
}

/// `POST /admin/kek/rotate`, `POST /admin/verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartJobResponse {
    pub job: Job,
    /// `false` when a job of that kind was already running and is returned instead.
    pub started: bool,
}

/// `GET /admin/jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsResponse {
    pub jobs: Vec<Job>,
}

/// A wire state: serialized as its snake-case name, shown the same way.
macro_rules! wire_state {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_state;

wire_state! {
    /// What the KMS did with a KEK version.
    KekVersionState {
        /// Usable: the current version, or an older one records may still depend on.
        Active => "active",
        /// Every DEK moved off it; kept for old backups until `kek destroy`.
        Retired => "retired",
        /// Removed from the HSM.
        Destroyed => "destroyed",
    }
}

wire_state! {
    /// The HSM backend's state.
    HsmState {
        Ready => "ready",
        /// Sessions being re-established.
        Recovering => "recovering",
        /// The token refused the PIN: fix `hsm.pin_file` and restart.
        PinRejected => "pin_rejected",
    }
}

#[allow(clippy::derivable_impls)] // (the macro's derive list is shared; only this one has a default)
impl Default for HsmState {
    fn default() -> Self {
        HsmState::Ready
    }
}

/// One KEK version as `status` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekVersionStatus {
    pub version: KekVersion,
    /// What the KMS did with it.
    pub state: KekVersionState,
    /// Whether the HSM holds an object of this version now.
    pub in_hsm: bool,
    /// Active DEKs wrapped under it.
    pub deks: u64,
    pub current: bool,
}

/// `GET /admin/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub kek_id: KekId,
    pub current_version: KekVersion,
    pub versions: Vec<KekVersionStatus>,
    pub active_deks: u64,
    pub destroyed_deks: u64,
    /// Running jobs, then the most recent finished ones.
    pub jobs: Vec<Job>,
    /// The unwrapped-DEK cache.
    pub cache: CacheStatus,
    /// The HSM backend: state, workers and counters since start.
    pub hsm: HsmStatus,
    /// The locked memory DEKs are held in.
    #[serde(default)]
    pub key_memory: KeyMemory,
    /// Process alerts (e.g. `single_user`, `core_dumps_not_denied`, `key_memory_unlocked`).
    #[serde(default)]
    pub alerts: Vec<String>,
}

/// The arena of locked memory every unwrapped DEK is held in, as `status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMemory {
    /// Whether the OS locked the arena into RAM (`mlock`): when `false`, DEKs may be written
    /// to swap; the KMS's start-up log says why.
    pub locked: bool,
    /// 32-byte slots in the arena (`cache.max_entries` plus headroom for requests in flight).
    pub slots: u64,
    /// Slots holding a DEK now.
    pub in_use: u64,
    /// DEKs held in ordinary memory since start because every slot was taken.
    pub unlocked_keys: u64,
}

/// The unwrapped-DEK cache as `status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStatus {
    /// DEKs held unwrapped now.
    pub entries: u64,
    /// `cache.max_entries` (0: the cache is off).
    pub max_entries: u64,
    /// `cache.ttl_secs` (0: the cache is off).
    pub ttl_secs: u64,
}

/// The HSM backend as `status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsmStatus {
    pub state: HsmState,
    /// Worker threads, one PKCS#11 session each (`hsm.sessions`).
    pub workers: u64,
    /// Sessions open now.
    pub sessions_open: u64,
    /// Operations sent to the HSM since start.
    pub calls: u64,
    /// Operations that failed (a wrapped DEK that does not authenticate is not counted).
    pub errors: u64,
    /// Times sessions were reopened after a loss.
    pub recoveries: u64,
    /// PKCS#11 library resets after a lost token.
    pub resets: u64,
    /// Jobs refused because every worker queue was full.
    pub overloaded: u64,
    /// What the token offers, as read and probed at start (absent for a backend that is
    /// not a PKCS#11 token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenCapabilities>,
}

/// The token's capability profile (`progressdb-kms status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCapabilities {
    /// The PKCS#11 library: manufacturer, description, version.
    pub library: String,
    /// The token: manufacturer and model.
    pub token: String,
    /// How DEKs are wrapped under the KEK.
    pub dek_wrap: String,
    /// Key-wrap mechanisms the token has, most preferred first.
    pub key_wrap: Vec<String>,
    /// The token's cap on sessions, when it states one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u64>,
    /// A sensitive key's value stays in the token (probed at start).
    pub sensitive_values_enforced: bool,
    /// Where unwrapped DEKs live: `memory` (the KMS's cache) or `hsm` (session objects
    /// inside the token; `hsm.dek_residency`).
    #[serde(default = "memory")]
    pub dek_residency: String,
}

fn memory() -> String {
    "memory".into()
}

/// `POST /admin/kek/destroy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyKekRequest {
    pub version: KekVersion,
}

/// Answer to `POST /admin/kek/destroy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyKekResponse {
    pub version: KekVersion,
    pub destroyed: bool,
}

/// One entry of the tamper-evident audit log. Its `mac` is
/// `HMAC-SHA256(audit key in the HSM, mac of the previous entry || "progressdb-kms:audit:v1" 0x00 || JSON of the other fields)`,
/// so editing, removing, inserting or reordering entries breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1, 2, 3, ... without gaps.
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// What happened, e.g. `dek.create`, `kek.rotate`, `admin.refused`.
    pub action: String,
    /// Who asked: `uid:<n>` or `cert:<sha256 prefix>` on the client endpoint, `admin:...` on
    /// the admin endpoint, `kms` for the KMS's own jobs.
    pub actor: String,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    /// Ids and versions only (never key material).
    #[serde(default)]
    pub detail: BTreeMap<String, String>,
    /// Hex.
    pub mac: String,
}

/// `GET /admin/audit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditListResponse {
    pub entries: Vec<AuditEntry>,
}

/// What `audit verify` found wrong first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditProblem {
    /// `mac_mismatch` (an edited, inserted or reordered entry), `gap` (removed entries),
    /// `moved` (an entry stored under another sequence number), `undecodable`,
    /// `truncated_tail` (the log ends before the recorded head), `beyond_head`,
    /// `head_mismatch`, `head_missing`.
    pub kind: String,
    /// The first bad sequence number.
    pub seq: u64,
    pub message: String,
}

/// `POST /admin/audit/verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerifyResponse {
    pub ok: bool,
    /// Entries that verified before the first problem (all of them when `ok`).
    pub verified: u64,
    /// The head the store records: the last entry's sequence number.
    pub head_seq: u64,
    /// The last entry archived and removed from the store (`audit compact`): verification
    /// starts after it, from its sealed anchor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_through: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<AuditProblem>,
}

/// `POST /admin/audit/compact`: removes the audit entries up to `through` (and the tombstones
/// of keys destroyed by then) once they are archived. `mac` is the archive's last entry's
/// (`through`'s) MAC, which the stored entry must have; `archive_sha256` identifies the
/// archive file in the `audit.compact` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditCompactRequest {
    pub through: u64,
    pub mac: String,
    pub archive_sha256: String,
}

/// The answer to `POST /admin/audit/compact`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCompactResponse {
    /// The log now begins after this entry (its anchor).
    pub through: u64,
    pub entries_removed: u64,
    /// Key records of keys destroyed at or before `through`'s time.
    pub tombstones_removed: u64,
}

/// One thread's copy of its key, as the server stores it (`GET /admin/kms/key-copies` on the
/// server gives them all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCopy {
    pub thread_id: crate::ids::ThreadId,
    pub key_id: KeyId,
    pub wrapped_dek: crate::ids::WrappedDek,
    pub kek_id: KekId,
    pub kek_version: KekVersion,
}

/// `POST /admin/import-copies`: rebuild lost key records from the server's copies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCopiesRequest {
    pub copies: Vec<KeyCopy>,
}

/// A copy that could not be imported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unrecovered {
    pub thread_id: crate::ids::ThreadId,
    pub key_id: KeyId,
    /// `destroyed` (the key was shredded: never brought back this way), `does_not_unwrap`
    /// (the copy is not a valid wrapped DEK of that key id under that KEK), `kek_destroyed`.
    pub reason: String,
}

/// What `import-copies` did. Every copy is unwrapped in the HSM before it is imported: a
/// forged or damaged copy is refused, never stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub copies: u64,
    /// Key records rebuilt.
    pub imported: u64,
    /// Keys the store already has (left as they are).
    pub present: u64,
    pub unrecovered: Vec<Unrecovered>,
}

/// What `restore` did with each record of a backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Records in the backup.
    pub records: u64,
    /// Active records added (the store did not have them).
    pub imported: u64,
    /// Records identical in the store already.
    pub unchanged: u64,
    /// Tombstones (destroyed keys) added.
    pub tombstones_imported: u64,
    /// Keys destroyed in the store whose backup copy was *not* restored (a destroyed key is
    /// brought back only when named with `--resurrect`).
    pub tombstoned: Vec<KeyId>,
    /// Destroyed keys brought back because they were named.
    pub resurrected: Vec<KeyId>,
    /// Keys whose store record differs from the backup's; the store's was kept.
    pub conflicts: Vec<KeyId>,
    /// Keys under a KEK version destroyed in the HSM: not importable (they cannot unwrap).
    pub kek_unavailable: Vec<KeyId>,
    /// Keys active in the backup but destroyed after it was made (per the audit log): kept
    /// destroyed, and imported as tombstones, unless named with `--resurrect`.
    #[serde(default)]
    pub destroyed_after_backup: Vec<KeyId>,
    /// Keys the audit log records destroyed after the backup that are *active* in the store
    /// (a store rolled back, or a record written behind the KMS's back). Left as they are:
    /// destroy them (`DELETE` of their threads, or `destroy_key`) after checking why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active_but_destroyed: Vec<KeyId>,
    /// How destroys made after the backup were found: `store` (the store's own audit log
    /// continues the backup's), `export` (an audit export given with the restore), `export
    /// and store` (an archive, then the store's log after it), or `unchecked` (neither; the
    /// operator accepted that keys destroyed since the backup come back).
    #[serde(default)]
    pub destroys_checked_by: String,
    /// The last audit entry checked for destroys (0 when unchecked).
    #[serde(default)]
    pub destroys_checked_through: u64,
}

/// A point in the audit log: the entry `seq` and its chain MAC (hex). A backup carries the
/// head it was made at, under its HMAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditMark {
    pub seq: u64,
    pub mac: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_parse_strictly() {
        let id = JobId::from_random([0xab; 8]);
        assert_eq!(id.as_str(), "job-abababababababab");
        assert_eq!(JobId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "job-",
            "job-ABABABABABABABAB",
            "job-abababababababa",
            "jab-abababababababab",
            "job-../../etc/pass",
        ] {
            assert!(JobId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_json_shape() {
        let j = Job {
            id: JobId::from_random([1; 8]),
            kind: JobKind::RotateKek {
                target: KekVersion::new(2).unwrap(),
            },
            state: JobState::Rewrapping,
            cursor: None,
            progress: JobProgress::default(),
            created_at: 1,
            updated_at: 2,
            finished_at: None,
        };
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["kind"]["type"], "rotate_kek");
        assert_eq!(v["kind"]["target"], 2);
        assert_eq!(v["state"], "rewrapping");
        let back: Job = serde_json::from_value(v).unwrap();
        assert_eq!(back, j);
    }
}
