//! The admin subcommands of `progressdb-kms`: clients of the **running** KMS's admin socket
//! (`listen.admin_unix` of the same `--config` file), so one process keeps owning the key
//! store and the PKCS#11 session. Long jobs show a progress bar with rate and ETA on a
//! terminal and a log line every few seconds otherwise.
//!
//! Exit status: 0 on success; 1 when the job failed or the KMS refused (the reason is one
//! line on stderr); 3 when the admin socket cannot be reached (is the KMS running?).

use std::time::Duration;

use kms_api::admin::JobId;
use kms_api::{ClientError, Endpoint, KmsClient, KmsClientConfig};

use crate::config::Config;

mod audit;
mod backup;
mod jobs;
mod status;

pub use audit::{audit_compact, audit_list, audit_verify};
pub use backup::{backup, import_copies, restore, RestoreCheck};
pub use jobs::{destroy_kek, jobs, rotate_kek, verify};
pub use status::status;

/// How a failed admin command ends.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The admin socket did not answer.
    #[error("cannot reach the KMS admin socket {path}: {detail} (is `progressdb-kms serve` running with this config?)")]
    Unreachable { path: String, detail: String },
    /// The KMS answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The job ended in `failed`.
    #[error("job {id} failed: {reason}")]
    JobFailed { id: JobId, reason: String },
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => 3,
            CliError::Refused(_) | CliError::JobFailed { .. } => 1,
        }
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Whether to wait for a job to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    UntilDone,
    No,
}

/// The client of `cfg`'s admin socket.
pub fn admin_client(cfg: &Config) -> Result<KmsClient, CliError> {
    let mut c = KmsClientConfig::new(Endpoint::Unix(cfg.admin.unix.clone()), None);
    c.request_timeout = Duration::from_secs(600);
    c.max_retries = 0;
    KmsClient::new(c).map_err(|e| CliError::Unreachable {
        path: cfg.admin.unix.display().to_string(),
        detail: e.to_string(),
    })
}

fn map_err(cfg: &Config, e: ClientError) -> CliError {
    match e {
        ClientError::Unavailable(detail) => CliError::Unreachable {
            path: cfg.admin.unix.display().to_string(),
            detail,
        },
        ClientError::Api { code, message, .. } => {
            CliError::Refused(format!("the KMS refused: {message} ({})", code.as_str()))
        }
        other => CliError::Refused(other.to_string()),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
