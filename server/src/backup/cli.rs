//! The operator commands around backups: `progressdb backup` (asks the running server for a
//! backup over its API, with the first admin key of the keys file, and writes it atomically),
//! `progressdb verify` (walks the server's `POST /admin/verify`) and `progressdb
//! backup-check`.

use std::io::{BufReader, Write as _};

use service_kit::new_file::{Existing, NewFile};
use std::path::Path;

use http_body_util::BodyExt as _;

use super::*;
use crate::config::Config;

/// Writes a backup of the server running with `cfg` to `out`, a new file: written beside it
/// under a temporary name ([`NewFile`]), checked whole, synced, then linked as `out` (never
/// over an existing file). Returns its manifest.
///
/// # Errors
/// A one-line reason: the server cannot be reached or refuses, the file cannot be written,
/// or what arrived is not a whole backup (nothing is left at `out`).
pub async fn backup(cfg: &Config, out: &Path) -> Result<Manifest, String> {
    if out.exists() {
        return Err(format!("{} exists: give a new file", out.display()));
    }
    let client = crate::admin_client::AdminClient::from_config(cfg)?;
    let (status, mut body) = client
        .send(http::Method::POST, "/admin/backup", None)
        .await?;
    if !status.is_success() {
        let text = crate::admin_client::text(body).await;
        let hint = if status == http::StatusCode::INSUFFICIENT_STORAGE {
            " (the copy is made beside the store, whose file system needs room for the \
             store's size, 64 MiB and a tenth more: the server log says how much is free)"
        } else {
            ""
        };
        return Err(format!(
            "the server refused the backup: {status} {text}{hint}"
        ));
    }
    let (file, mut f) = NewFile::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the backup stopped arriving: {e}"))?;
        if let Ok(data) = frame.into_data() {
            f.write_all(&data)
                .map_err(|e| format!("{}: {e}", out.display()))?;
        }
    }
    // Checked whole as a restore would check it, before it takes the name.
    let m = check_whole(&mut f).map_err(|e| e.to_string())?;
    file.commit(f, Existing::Keep)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(m)
}

/// Reads back the file being written and checks it as a restore does.
fn check_whole(f: &mut std::fs::File) -> Result<Manifest, BackupError> {
    use std::io::Seek as _;
    f.sync_all()?;
    let mut copy = f.try_clone()?;
    copy.seek(std::io::SeekFrom::Start(0))?;
    let mut r = BufReader::new(copy);
    let m = read_header(&mut r)?;
    copy_data(&mut r, &mut std::io::sink(), &m)?;
    Ok(m)
}

/// `progressdb backup-check`: the pairing of the server backup at `backup` with the KMS
/// backup at `kms_backup`.
///
/// # Errors
/// A one-line reason when either file cannot be read or is not a backup.
pub fn check_pair(backup: &Path, kms_backup: &Path) -> Result<pair::PairReport, String> {
    let mut r = BufReader::new(
        std::fs::File::open(backup).map_err(|e| format!("{}: {e}", backup.display()))?,
    );
    let m = read_header(&mut r).map_err(|e| format!("{}: {e}", backup.display()))?;
    let kms = std::fs::read(kms_backup).map_err(|e| format!("{}: {e}", kms_backup.display()))?;
    pair::check(&m, &kms).map_err(|e| format!("{}: {e}", kms_backup.display()))
}

/// Back-offs between the tries of one page of `progressdb verify` while the server cannot be
/// reached or answers 503 (the KMS unavailable, a restart): about half a minute in all.
const VERIFY_BACKOFF: [u64; 5] = [1, 2, 4, 8, 16];

/// One page of `POST /admin/verify`, tried again after each back-off while the server is
/// unreachable or answers 503.
async fn verify_page(
    client: &crate::admin_client::AdminClient,
    body: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let mut waits = VERIFY_BACKOFF.iter();
    loop {
        let why = match client
            .send(http::Method::POST, "/admin/verify", Some(body))
            .await
        {
            Ok((status, b)) if status.is_success() => {
                let bytes = b
                    .collect()
                    .await
                    .map_err(|e| format!("reading a verify page: {e}"))?
                    .to_bytes();
                return serde_json::from_slice(&bytes)
                    .map_err(|e| format!("a verify page is not JSON: {e}"));
            }
            Ok((status, b)) => {
                let text = crate::admin_client::text(b).await;
                if status != http::StatusCode::SERVICE_UNAVAILABLE {
                    return Err(format!("the server refused: {status} {text}"));
                }
                format!("{status} {text}")
            }
            Err(e) => e,
        };
        match waits.next() {
            Some(secs) => {
                tracing::warn!(error = %why, retry_in_secs = secs, "verify: trying the page again");
                tokio::time::sleep(std::time::Duration::from_secs(*secs)).await;
            }
            None => return Err(why),
        }
    }
}

/// What `progressdb verify` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyTotals {
    pub threads: u64,
    pub threads_ok: u64,
    pub messages_checked: u64,
    pub messages_unreadable: u64,
    /// Every thread with a problem, as the server reported it.
    pub problems: Vec<serde_json::Value>,
}

/// `progressdb verify`: every thread of the running server checked (its keys at the KMS,
/// every `sample`-th message opening), a page at a time, with a progress bar on a terminal.
///
/// # Errors
/// A one-line reason when the server cannot be reached or refuses.
pub async fn verify(
    cfg: &Config,
    sample: u64,
    from: Option<String>,
) -> Result<VerifyTotals, String> {
    let client = crate::admin_client::AdminClient::from_config(cfg)?;
    let stats = client.json(http::Method::GET, "/admin/stats", None).await?;
    let bar = indicatif::ProgressBar::with_draw_target(
        stats["threads"].as_u64(),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} threads, {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut totals = VerifyTotals::default();
    let mut after = from;
    loop {
        let body = serde_json::json!({"after": after, "limit": 100, "sample": sample});
        let page = verify_page(&client, &body)
            .await
            .map_err(|e| match &after {
                Some(a) => format!("{e} (threads up to {a} were checked: resume with --after {a})"),
                None => e,
            })?;
        for t in page["threads"].as_array().into_iter().flatten() {
            totals.threads += 1;
            let checked = t["messages_checked"].as_u64().unwrap_or(0);
            let unreadable = t["unreadable"].as_u64().unwrap_or(0);
            totals.messages_checked += checked;
            totals.messages_unreadable += unreadable;
            // The server judges each thread; anything but an explicit `true` is a problem.
            if t["ok"] == serde_json::Value::Bool(true) {
                totals.threads_ok += 1;
            } else {
                totals.problems.push(t.clone());
            }
            bar.inc(1);
        }
        bar.set_message(format!(
            "{} messages, {} unreadable",
            totals.messages_checked, totals.messages_unreadable
        ));
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    bar.finish_and_clear();
    Ok(totals)
}
