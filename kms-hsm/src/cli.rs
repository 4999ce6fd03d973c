//! The admin subcommands of `progressdb-kms`: clients of the **running** KMS's admin socket
//! (`listen.admin_unix` of the same `--config` file), so one process keeps owning the key
//! store and the PKCS#11 session. Long jobs show a progress bar with rate and ETA on a
//! terminal and a log line every few seconds otherwise.
//!
//! Exit status: 0 on success; 1 when the job failed or the KMS refused (the reason is one
//! line on stderr); 3 when the admin socket cannot be reached (is the KMS running?).

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use kms_api::admin::{Job, JobId, JobState, StatusResponse};
use kms_api::{ClientError, Endpoint, KekVersion, KmsClient, KmsClientConfig};

use crate::config::Config;

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

/// `progressdb-kms status`.
pub async fn status(cfg: &Config, out: Output) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    let s = c.admin_status().await.map_err(|e| map_err(cfg, e))?;
    match out {
        Output::Json => println!("{}", to_json(&s)),
        Output::Text => print_status(&s),
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn print_status(s: &StatusResponse) {
    println!("KEK {} (current version {})", s.kek_id, s.current_version);
    println!("  version  state      in HSM  DEKs");
    for v in &s.versions {
        println!(
            "  {:>7}  {:<9}  {:<6}  {}{}",
            v.version,
            v.state,
            if v.in_hsm { "yes" } else { "no" },
            v.deks,
            if v.current { "  (current)" } else { "" }
        );
    }
    println!(
        "DEKs: {} active, {} destroyed",
        s.active_deks, s.destroyed_deks
    );
    let c = &s.cache;
    if c.max_entries == 0 || c.ttl_secs == 0 {
        println!("cache: off");
    } else {
        println!(
            "cache: {} of {} DEKs held, ttl {} s",
            c.entries, c.max_entries, c.ttl_secs
        );
    }
    if !s.alerts.is_empty() {
        println!("ALERTS: {}", s.alerts.join(", "));
    }
    let m = &s.key_memory;
    println!(
        "key memory: {}, {} of {} slots in use{}",
        if m.locked {
            "locked (mlock)"
        } else {
            "NOT locked (DEKs may reach swap)"
        },
        m.in_use,
        m.slots,
        if m.unlocked_keys > 0 {
            format!(", {} DEKs held unlocked (arena full)", m.unlocked_keys)
        } else {
            String::new()
        }
    );
    let h = &s.hsm;
    println!(
        "HSM: {}, {} workers, {} sessions open; {} calls, {} errors, {} recoveries, {} resets, {} refused (queues full)",
        h.state, h.workers, h.sessions_open, h.calls, h.errors, h.recoveries, h.resets, h.overloaded
    );
    if let Some(t) = &h.token {
        println!(
            "token: {} ({}); DEKs in {}; DEKs wrapped with {}; key wrap: {}; sessions: {}; sensitive values {}",
            t.token,
            t.library,
            if t.dek_residency == "hsm" {
                "the HSM (session objects)"
            } else {
                "memory (the KMS's cache)"
            },
            t.dek_wrap,
            if t.key_wrap.is_empty() {
                "none".to_owned()
            } else {
                t.key_wrap.join(", ")
            },
            t.max_sessions
                .map_or_else(|| "no stated cap".to_owned(), |n| format!("at most {n}")),
            if t.sensitive_values_enforced {
                "stay in the token (probed)"
            } else {
                "NOT enforced"
            }
        );
    }
    if s.jobs.is_empty() {
        println!("jobs: none");
    }
    for j in &s.jobs {
        println!("job {}", describe(j));
    }
}

fn describe(j: &Job) -> String {
    let p = &j.progress;
    let mut line = format!(
        "{} {} {:?}: {}/{} scanned, {} rewrapped, {} already current, {} verified, {} failed",
        j.id,
        j.kind.label(),
        j.state,
        p.scanned,
        p.total,
        p.rewrapped,
        p.already_current,
        p.verified,
        p.failed
    );
    if !p.per_version.is_empty() {
        let per: Vec<String> = p
            .per_version
            .iter()
            .map(|(v, n)| format!("v{v}: {n}"))
            .collect();
        line.push_str(&format!(" [{}]", per.join(", ")));
    }
    if let Some(e) = &p.error {
        line.push_str(&format!(" — {e}"));
    }
    line
}

/// `progressdb-kms rotate-kek`.
pub async fn rotate_kek(cfg: &Config, wait: Wait, out: Output) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    let r = c.rotate_kek().await.map_err(|e| map_err(cfg, e))?;
    if out == Output::Text {
        if r.started {
            println!(
                "started KEK rotation {} (to version {})",
                r.job.id,
                target(&r.job)
            );
        } else {
            println!("a KEK rotation is already running: {}", r.job.id);
        }
    }
    finish(cfg, &c, r.job, wait, out).await
}

fn target(j: &Job) -> String {
    match &j.kind {
        kms_api::admin::JobKind::RotateKek { target } => target.to_string(),
        kms_api::admin::JobKind::Verify => "-".into(),
    }
}

/// `progressdb-kms verify`.
pub async fn verify(cfg: &Config, wait: Wait, out: Output) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    let r = c.start_verify().await.map_err(|e| map_err(cfg, e))?;
    if out == Output::Text {
        println!("verifying every DEK: job {}", r.job.id);
    }
    finish(cfg, &c, r.job, wait, out).await
}

/// `progressdb-kms jobs [--id ID]`.
pub async fn jobs(cfg: &Config, id: Option<JobId>, out: Output) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    match id {
        Some(id) => {
            let j = c.job(&id).await.map_err(|e| map_err(cfg, e))?;
            match out {
                Output::Json => println!("{}", to_json(&j)),
                Output::Text => println!("{}", describe(&j)),
            }
        }
        None => {
            let js = c.jobs().await.map_err(|e| map_err(cfg, e))?;
            match out {
                Output::Json => println!("{}", to_json(&js)),
                Output::Text => {
                    for j in &js.jobs {
                        println!("{}", describe(j));
                    }
                }
            }
        }
    }
    Ok(())
}

/// `progressdb-kms kek destroy --version V`.
pub async fn destroy_kek(cfg: &Config, version: KekVersion) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    c.destroy_kek(version).await.map_err(|e| map_err(cfg, e))?;
    println!("KEK version {version} destroyed in the HSM");
    Ok(())
}

/// Waits for `job` to end (unless `wait` says not to), showing progress, and reports it.
async fn finish(
    cfg: &Config,
    c: &KmsClient,
    mut job: Job,
    wait: Wait,
    out: Output,
) -> Result<(), CliError> {
    if wait == Wait::UntilDone {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(job.progress.total.max(1));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, ETA {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        let mut last_log = Instant::now();
        while !job.state.is_final() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            job = c.job(&job.id).await.map_err(|e| map_err(cfg, e))?;
            let p = &job.progress;
            match &bar {
                Some(b) => {
                    b.set_length(p.total.max(p.scanned).max(1));
                    b.set_position(p.scanned);
                    b.set_message(format!("{:?}", job.state).to_lowercase());
                }
                None if last_log.elapsed() >= Duration::from_secs(5) => {
                    eprintln!("progress: {}", describe(&job));
                    last_log = Instant::now();
                }
                None => {}
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    match out {
        Output::Json => println!("{}", to_json(&job)),
        Output::Text => println!("{}", describe(&job)),
    }
    if job.state == JobState::Failed {
        return Err(CliError::JobFailed {
            id: job.id.clone(),
            reason: job
                .progress
                .error
                .clone()
                .unwrap_or_else(|| "see the KMS log".into()),
        });
    }
    Ok(())
}

/// `progressdb-kms audit verify`: exit 0 when the whole log verifies, 1 naming the first bad
/// entry otherwise.
pub async fn audit_verify(cfg: &Config, out: Output) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    let v = c.audit_verify().await.map_err(|e| map_err(cfg, e))?;
    match out {
        Output::Json => println!("{}", to_json(&v)),
        Output::Text => match &v.problem {
            None => println!(
                "audit log verified: {} entries, head {}",
                v.verified, v.head_seq
            ),
            Some(p) => println!(
                "audit log is NOT intact: {} at entry {}: {} ({} entries verified before it)",
                p.kind, p.seq, p.message, v.verified
            ),
        },
    }
    match v.problem {
        None => Ok(()),
        Some(p) => Err(CliError::Refused(format!(
            "audit log verification failed at entry {}: {}",
            p.seq, p.kind
        ))),
    }
}

/// `progressdb-kms audit compact --archive FILE`: removes the entries the archive holds from
/// the store (see [`crate::audit_archive`]). The archive's entries must be numbered without a
/// gap; the KMS checks that its last one is the stored entry of that number.
pub async fn audit_compact(cfg: &Config, archive: &std::path::Path) -> Result<(), CliError> {
    let bytes = std::fs::read(archive)
        .map_err(|e| CliError::Refused(format!("{}: {e}", archive.display())))?;
    let entries = read_audit_export(archive, 0)?;
    let Some(last) = entries.last() else {
        return Err(CliError::Refused(format!(
            "{}: no audit entry in it",
            archive.display()
        )));
    };
    if let Some(w) = entries.windows(2).find(|w| w[1].seq != w[0].seq + 1) {
        return Err(CliError::Refused(format!(
            "{}: entry {} is followed by {}: the archive has a gap or is out of order",
            archive.display(),
            w[0].seq,
            w[1].seq
        )));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let req = kms_api::admin::AuditCompactRequest {
        through: last.seq,
        mac: last.mac.clone(),
        archive_sha256: hex::encode(digest.as_ref()),
    };
    let c = admin_client(cfg)?;
    let r = c.audit_compact(&req).await.map_err(|e| map_err(cfg, e))?;
    println!(
        "audit log compacted through entry {}: {} entries and {} tombstones removed from the \
         key store; keep {} (sha256 {}) with the backups",
        r.through,
        r.entries_removed,
        r.tombstones_removed,
        archive.display(),
        req.archive_sha256
    );
    Ok(())
}

/// `progressdb-kms audit list`: prints entries (JSON lines) after `after`.
pub async fn audit_list(cfg: &Config, after: u64, limit: usize) -> Result<(), CliError> {
    let c = admin_client(cfg)?;
    let mut after = after;
    let mut left = limit;
    while left > 0 {
        let page = c
            .audit_entries(after, left.min(1000))
            .await
            .map_err(|e| map_err(cfg, e))?;
        let Some(last) = page.entries.last().map(|e| e.seq) else {
            break;
        };
        for e in &page.entries {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        }
        left = left.saturating_sub(page.entries.len());
        after = last;
    }
    Ok(())
}

/// The error of a raw admin answer that is not 2xx.
fn raw_error(status: u16, body: &[u8]) -> CliError {
    match serde_json::from_slice::<kms_api::ErrorBody>(body) {
        Ok(b) => CliError::Refused(format!(
            "the KMS refused: {} ({})",
            b.error.message,
            b.error.code.as_str()
        )),
        Err(_) => CliError::Refused(format!("the KMS answered {status}")),
    }
}

/// `progressdb-kms backup --out FILE`: every key record (wrapped DEKs and metadata only) in
/// an HSM-HMAC-protected file, written 0600 and atomically (a temp file, then renamed).
pub async fn backup(cfg: &Config, out_path: &std::path::Path) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let c = admin_client(cfg)?;
    let (status, body) = c
        .raw(http::Method::GET, "/admin/backup", Vec::new())
        .await
        .map_err(|e| map_err(cfg, e))?;
    if status != 200 {
        return Err(raw_error(status, &body));
    }
    let records = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["records"].as_array().map(Vec::len))
        .unwrap_or(0);
    let dir = match out_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        out_path
            .file_name()
            .map_or_else(|| "backup".into(), |n| n.to_string_lossy().into_owned()),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out_path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(CliError::Refused(format!(
            "cannot write {}: {e}",
            out_path.display()
        )));
    }
    println!(
        "backup of {records} key records written to {} ({} bytes)",
        out_path.display(),
        body.len()
    );
    Ok(())
}

/// How `restore` learns the keys destroyed after the backup.
#[derive(Debug)]
pub enum RestoreCheck {
    /// From the store's own audit log (the KMS refuses when it does not continue the
    /// backup's).
    Store,
    /// From this audit export (JSON lines of `audit list`) when the store's log does not.
    Export(std::path::PathBuf),
    /// Not at all (`--accept-unchecked-destroys`).
    Unchecked,
}

/// The entries of an audit export (JSON lines, as `audit list` prints them) after `after`.
fn read_audit_export(
    path: &std::path::Path,
    after: u64,
) -> Result<Vec<kms_api::admin::AuditEntry>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Refused(format!("cannot read {}: {e}", path.display())))?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: kms_api::admin::AuditEntry = serde_json::from_str(line).map_err(|e| {
            CliError::Refused(format!(
                "{} line {}: not an audit entry (line {} column {})",
                path.display(),
                i + 1,
                e.line(),
                e.column()
            ))
        })?;
        if e.seq > after {
            entries.push(e);
        }
    }
    Ok(entries)
}

/// `progressdb-kms restore --in FILE [--resurrect KEY_ID]... [--audit FILE |
/// --accept-unchecked-destroys]`.
pub async fn restore(
    cfg: &Config,
    in_path: &std::path::Path,
    resurrect: &[kms_api::KeyId],
    check: RestoreCheck,
    out: Output,
) -> Result<(), CliError> {
    let file = std::fs::read(in_path)
        .map_err(|e| CliError::Refused(format!("cannot read {}: {e}", in_path.display())))?;
    let body = match &check {
        RestoreCheck::Export(audit) => {
            // Only the entries after the backup's head are sent (the KMS verifies them as the
            // chain's continuation from that head, which the backup's HMAC covers).
            #[derive(serde::Deserialize)]
            struct Head {
                audit_head: Option<kms_api::admin::AuditMark>,
            }
            let raw: &serde_json::value::RawValue = serde_json::from_slice(&file).map_err(|e| {
                CliError::Refused(format!(
                    "{}: not a backup file (line {} column {})",
                    in_path.display(),
                    e.line(),
                    e.column()
                ))
            })?;
            let after = serde_json::from_str::<Head>(raw.get())
                .ok()
                .and_then(|h| h.audit_head)
                .map_or(0, |h| h.seq);
            let entries = read_audit_export(audit, after)?;
            serde_json::to_vec(&serde_json::json!({"backup": raw, "audit": entries}))
                .map_err(|e| CliError::Refused(format!("cannot encode the request: {e}")))?
        }
        RestoreCheck::Store | RestoreCheck::Unchecked => file,
    };
    let c = admin_client(cfg)?;
    let mut query: Vec<String> = resurrect
        .iter()
        .map(|k| format!("resurrect={}", k.as_str()))
        .collect();
    if matches!(check, RestoreCheck::Unchecked) {
        query.push("destroys=unchecked".into());
    }
    let path = if query.is_empty() {
        "/admin/restore".to_owned()
    } else {
        format!("/admin/restore?{}", query.join("&"))
    };
    let (status, answer) = c
        .raw(http::Method::POST, &path, body)
        .await
        .map_err(|e| map_err(cfg, e))?;
    if status != 200 {
        return Err(raw_error(status, &answer));
    }
    let report: kms_api::admin::RestoreReport = serde_json::from_slice(&answer)
        .map_err(|e| CliError::Refused(format!("unexpected answer: {e}")))?;
    match out {
        Output::Json => println!("{}", to_json(&report)),
        Output::Text => {
            println!(
                "restored from {}: {} records, {} imported, {} unchanged, {} tombstones imported",
                in_path.display(),
                report.records,
                report.imported,
                report.unchanged,
                report.tombstones_imported
            );
            println!(
                "destroys after the backup checked by: {} (through audit entry {})",
                report.destroys_checked_by, report.destroys_checked_through
            );
            for (what, keys) in [
                (
                    "kept destroyed (name them with --resurrect to bring them back)",
                    &report.tombstoned,
                ),
                (
                    "destroyed after the backup, imported as destroyed (name them with --resurrect to bring them back)",
                    &report.destroyed_after_backup,
                ),
                ("resurrected", &report.resurrected),
                ("conflicts (the store's record was kept)", &report.conflicts),
                (
                    "under a destroyed KEK version (skipped)",
                    &report.kek_unavailable,
                ),
            ] {
                if !keys.is_empty() {
                    let ids: Vec<&str> = keys.iter().map(kms_api::KeyId::as_str).collect();
                    println!("  {} {what}: {}", keys.len(), ids.join(" "));
                }
            }
        }
    }
    Ok(())
}

/// `progressdb-kms import-copies --in FILE`: FILE is what the server's
/// `GET /admin/kms/key-copies` answers (`{"copies": [...]}`).
pub async fn import_copies(
    cfg: &Config,
    in_path: &std::path::Path,
    out: Output,
) -> Result<(), CliError> {
    let body = std::fs::read(in_path)
        .map_err(|e| CliError::Refused(format!("cannot read {}: {e}", in_path.display())))?;
    let c = admin_client(cfg)?;
    let (status, answer) = c
        .raw(http::Method::POST, "/admin/import-copies", body)
        .await
        .map_err(|e| map_err(cfg, e))?;
    if status != 200 {
        return Err(raw_error(status, &answer));
    }
    let report: kms_api::admin::ImportReport = serde_json::from_slice(&answer)
        .map_err(|e| CliError::Refused(format!("unexpected answer: {e}")))?;
    match out {
        Output::Json => println!("{}", to_json(&report)),
        Output::Text => {
            println!(
                "{} copies: {} key records rebuilt, {} already present, {} not recoverable",
                report.copies,
                report.imported,
                report.present,
                report.unrecovered.len()
            );
            for u in &report.unrecovered {
                println!(
                    "  thread {} (key {}): {}",
                    u.thread_id,
                    u.key_id.as_str(),
                    u.reason
                );
            }
        }
    }
    Ok(())
}
