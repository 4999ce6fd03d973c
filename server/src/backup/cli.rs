//! The operator commands around backups: `progressdb backup` (asks the running server for a
//! backup over its API, with the first admin key of the keys file, and writes it atomically),
//! `progressdb restore` (offline) and `progressdb backup-check`.

use std::io::{BufReader, Write as _};
use std::path::Path;

use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;

use super::*;
use crate::config::Config;

/// Writes a backup of the server running with `cfg` to `out` (a new file: `out.partial`
/// while it arrives, checked whole, synced, then renamed). Returns its manifest.
///
/// # Errors
/// A one-line reason: the server cannot be reached or refuses, the file cannot be written,
/// or what arrived is not a whole backup (nothing is left at `out`).
pub async fn backup(cfg: &Config, out: &Path) -> Result<Manifest, String> {
    if out.exists() {
        return Err(format!("{} exists: give a new file", out.display()));
    }
    let key = crate::auth::first_admin_key(&cfg.auth.keys_file).map_err(|e| e.to_string())?;
    let mut addr = cfg.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the server at {addr} (is it running?): {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP to {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::post("/admin/backup")
        .header(http::header::HOST, addr.to_string())
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", key.as_str()),
        )
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("POST /admin/backup: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(format!("the server refused the backup: {status} {text}"));
    }
    let partial = out.with_extension("partial");
    let written = async {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Owner-only, as the store it copies.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the backup stopped arriving: {e}"))?;
            if let Ok(data) = frame.into_data() {
                f.write_all(&data)
                    .map_err(|e| format!("{}: {e}", partial.display()))?;
            }
        }
        f.sync_all().map_err(|e| e.to_string())?;
        // Checked whole as a restore would check it.
        let mut r = BufReader::new(std::fs::File::open(&partial).map_err(|e| e.to_string())?);
        let m = read_header(&mut r).map_err(|e| e.to_string())?;
        copy_data(&mut r, &mut std::io::sink(), &m).map_err(|e| e.to_string())?;
        std::fs::rename(&partial, out).map_err(|e| format!("{}: {e}", out.display()))?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| e.to_string())?;
        }
        Ok::<Manifest, String>(m)
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
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
