//! `progressdb-kms status`, and the one-line description of a job that every job command
//! prints.

use kms_api::admin::{Job, StatusResponse};

use super::{admin_client, map_err, to_json, CliError, Output};
use crate::config::Config;

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

pub(super) fn describe(j: &Job) -> String {
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
