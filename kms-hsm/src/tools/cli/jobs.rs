//! The lifecycle job commands (`rotate-kek`, `verify`, `jobs`, `kek destroy`), and the wait
//! for a job to end with its progress bar or log lines.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use kms_api::admin::{Job, JobId, JobState};
use kms_api::{KekVersion, KmsClient};

use super::status::describe;
use super::{admin_client, map_err, to_json, CliError, Output, Wait};
use crate::config::Config;

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
