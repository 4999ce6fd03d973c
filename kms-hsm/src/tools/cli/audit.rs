//! The audit-log commands: `audit verify`, `audit compact`, `audit list`.

use super::{admin_client, map_err, to_json, CliError, Output};
use crate::config::Config;

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

/// The entries of an audit export (JSON lines, as `audit list` prints them) after `after`.
pub(super) fn read_audit_export(
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
