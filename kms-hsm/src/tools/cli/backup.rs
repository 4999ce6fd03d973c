//! The key-record transfer commands: `backup`, `restore` (with how it learns the keys
//! destroyed since the backup) and `import-copies`.

use super::audit::read_audit_export;
use super::{admin_client, map_err, to_json, CliError, Output};
use crate::config::Config;

/// `progressdb-kms backup --out FILE`: every key record (wrapped DEKs and metadata only) in
/// an HSM-HMAC-protected file, written 0600 and atomically (a temp file, then renamed).
pub async fn backup(cfg: &Config, out_path: &std::path::Path) -> Result<(), CliError> {
    use std::io::Write as _;
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
    let write = || -> std::io::Result<()> {
        use service_kit::new_file::{Existing, NewFile};
        let (file, mut f) = NewFile::create(out_path)?;
        f.write_all(&body)?;
        file.commit(f, Existing::Replace)
    };
    if let Err(e) = write() {
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
