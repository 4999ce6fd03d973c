//! `progressdb-bench`: every path of the system against the limit it approaches, measured in
//! the same run (`scripts/bench.sh` builds it in release mode and runs it).
//!
//! ```text
//! progressdb-bench [--quick] [--out PREFIX] [--only ID,ID] [--dir DIR]
//! ```
//!
//! It makes its own SoftHSM tokens, LMDB stores and sockets under a temporary directory (in
//! `DIR`, default the system temp dir: put it on the disk you care about, since the stores
//! fsync), starts the real binaries, runs each scenario of [`scenarios`] for a bounded time
//! interleaved with its limit, and writes `PREFIX.md` and `PREFIX.json` (without `--out`, the
//! Markdown goes to stdout). In `PREFIX.md` the text above [`report::MARKER`] is kept.
//! `--only` takes scenario id prefixes (`kms_encrypt`, `server`, `memory`, ...).
//!
//! The binaries under test: `E2E_BIN_DIR` if set, else this executable's directory (a
//! release build of all three), else `target/e2e/` (scripts/test.sh's debug builds). Child
//! logs are at `BENCH_CHILD_LOG` (default `warn`) in the temp dir, which is kept when a
//! scenario fails. `--quick` makes everything tiny (a smoke run for the tests).

mod hsm_raw;
mod measure;
mod procs;
mod report;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use kms_api::client::{Endpoint, KmsClient, KmsClientConfig};
use kms_api::KekId;
use std::str::FromStr as _;

use procs::{prepare_kms, resolve_bin_dir, spawn_kms, start_kms, CannedRun, ServerRun};
use scenarios::{Env, Outcome, Profile, ServerWork};

const USAGE: &str =
    "usage: progressdb-bench [--quick] [--out PREFIX] [--only ID,ID] [--dir DIR]\n       progressdb-bench --list\n       progressdb-bench serve-canned SOCKET BODY_FILE";

/// The scenario groups a full run measures, each the prefix of the ids of its scenarios
/// (`--only` takes these; `--list` prints them, so the smoke test checks the same list).
const SCENARIO_GROUPS: &[&str] = &[
    "kms_encrypt_1k",
    "kms_hsm_encrypt",
    "kms_decrypt_uncached",
    "kms_create_dek",
    "kms_encrypt_batch",
    "server_post",
    "server_page",
    "progressdb_thread_with_messages",
    "replicas_create",
    "replicas_server_post",
    "postgres_server_post",
    "thread_dek_rotation",
    "kek_rewrap",
    "memory",
];

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    only: Vec<String>,
    dir: Option<PathBuf>,
}

fn parse_args(argv: Vec<String>) -> Result<Args> {
    let mut args = Args {
        quick: false,
        out: None,
        only: Vec::new(),
        dir: None,
    };
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .ok_or_else(|| anyhow!("{what} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = Some(PathBuf::from(value("--out")?)),
            "--dir" => args.dir = Some(PathBuf::from(value("--dir")?)),
            "--only" => {
                args.only = value("--only")?
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--list" => {
                for g in SCENARIO_GROUPS {
                    println!("{g}");
                }
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("serve-canned") {
        return match (argv.get(1), argv.get(2)) {
            (Some(sock), Some(body)) => match procs::serve_canned(Path::new(sock), Path::new(body))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("serve-canned: {e:#}");
                    ExitCode::FAILURE
                }
            },
            _ => {
                eprintln!("{USAGE}");
                ExitCode::from(2)
            }
        };
    }
    match parse_args(argv).and_then(run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("progressdb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `/metrics` of a KMS.
pub async fn kms_metrics(client: &KmsClient) -> Result<String> {
    let (status, body) = client
        .raw(http::Method::GET, "/metrics", Vec::new())
        .await?;
    if status != 200 {
        bail!("KMS /metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn run(args: Args) -> Result<bool> {
    let p = Profile { quick: args.quick };
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("progressdb-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))?;
    let root = tmp.path().to_path_buf();
    let bins = resolve_bin_dir();
    std::env::set_var("E2E_BIN_DIR", &bins);
    // The raw loops' token, made before any thread exists: SoftHSM reads SOFTHSM2_CONF once
    // per process.
    let raw_token = prepare_kms(&bins, &root.join("raw"))?;
    std::env::set_var(raw_token.hsm.conf_var, &raw_token.hsm.conf);
    let raw = scenarios_raw(&raw_token)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let started = Instant::now();
    let load_before = loadavg();
    let want = |id: &str| args.only.is_empty() || args.only.iter().any(|o| id.starts_with(o));
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let env = Env {
        p,
        raw_sessions: Arc::new(raw.take_sessions()),
        raw: Arc::new(raw),
    };

    rt.block_on(async {
        let mut record = |what: &str, r: Result<Outcome>, failures: &mut Vec<String>| match r {
            Ok(o) => {
                eprintln!(
                    "  {:<34} {:>10.0} {:<8} ratio {}",
                    o.id,
                    o.system.rate(),
                    o.unit,
                    o.ratio().map_or("—".into(), |r| format!("{r:.2}"))
                );
                outcomes.push(o);
            }
            Err(e) => failures.push(format!("{what}: {e:#}")),
        };
        let kms = match start_kms(&bins, &root.join("kms"), &[]).await {
            Ok(k) => k,
            Err(e) => {
                record("starting the KMS", Err(e), &mut failures);
                return;
            }
        };
        if want("kms_encrypt_1k") {
            let r = async {
                let (key, body) = scenarios::canned_encrypt_body(&kms).await?;
                let canned = CannedRun::start(&root.join("canned"), &body).await?;
                let mut cfg = KmsClientConfig::new(Endpoint::from_str(&canned.endpoint)?, None);
                cfg.max_idle = 64;
                let cc = KmsClient::new(cfg)?;
                let a = scenarios::kms_encrypt(&env, &kms, &key, &canned, &cc, 1).await;
                let b = scenarios::kms_encrypt(&env, &kms, &key, &canned, &cc, 64).await;
                canned.stop()?;
                Ok::<_, anyhow::Error>((a, b))
            }
            .await;
            match r {
                Ok((a, b)) => {
                    record("kms_encrypt_1k_c1", a, &mut failures);
                    record("kms_encrypt_1k_c64", b, &mut failures);
                }
                Err(e) => record("kms_encrypt_1k", Err(e), &mut failures),
            }
        }
        if want("kms_hsm_encrypt") {
            let r = async {
                let p = procs::prepare_resident_kms(&bins, &root.join("kms-resident"))?;
                procs::spawn_kms(&bins, p, &[]).await
            }
            .await;
            match r {
                Ok(resident) => {
                    let a = scenarios::kms_hsm_encrypt(&env, &kms, &resident, 32).await;
                    record("kms_hsm_encrypt_1k_c32", a, &mut failures);
                    let b = scenarios::kms_hsm_encrypt_batch(&env, &kms, &resident).await;
                    record("kms_hsm_encrypt_batch", b, &mut failures);
                    if let Err(e) = resident.stop() {
                        record("stopping the resident KMS", Err(e), &mut failures);
                    }
                }
                Err(e) => record("kms_hsm_encrypt", Err(e), &mut failures),
            }
        }
        if want("kms_decrypt_uncached") {
            let r = async {
                let nc = start_kms(
                    &bins,
                    &root.join("kms-nocache"),
                    &[("PROGRESSDB_KMS__CACHE__MAX_ENTRIES", "0")],
                )
                .await?;
                let o = scenarios::kms_decrypt_uncached(&env, &nc).await;
                nc.stop()?;
                o
            }
            .await;
            record("kms_decrypt_uncached", r, &mut failures);
        }
        if want("kms_create_dek") {
            let r = scenarios::kms_create_dek(&env, &kms, &root.join("store-limit")).await;
            record("kms_create_dek", r, &mut failures);
        }
        if want("kms_encrypt_batch") {
            let r = scenarios::kms_encrypt_batch(&env, &kms).await;
            record("kms_encrypt_batch", r, &mut failures);
        }
        let servers = [
            "server_post",
            "server_page",
            "progressdb_thread_with_messages",
            "thread_dek_rotation",
            "memory",
            "replicas_server_post",
            "postgres_server_post",
        ]
        .iter()
        .any(|id| want(id));
        let mut enc = None;
        if servers {
            let r = tokio::task::block_in_place(|| -> Result<_> {
                let e = ServerRun::start(&bins, &root.join("server-enc"), &kms.endpoint, true)?;
                let pl = ServerRun::start(&bins, &root.join("server-plain"), &kms.endpoint, false)?;
                Ok((scenarios::prepare(e)?, scenarios::prepare(pl)?))
            });
            match r {
                Ok((e, pl)) => {
                    for (id, work, conc) in [
                        ("server_post", ServerWork::Post, 64),
                        ("server_page", ServerWork::Page, 16),
                        (
                            "progressdb_thread_with_messages",
                            ServerWork::ProgressDb,
                            64,
                        ),
                    ] {
                        if want(id) {
                            let r = tokio::task::block_in_place(|| {
                                scenarios::server_pair(&env, &e, &pl, &kms, work, conc)
                            });
                            record(id, r, &mut failures);
                        }
                    }
                    if let Err(e) = tokio::task::block_in_place(|| pl.run.stop()) {
                        failures.push(format!("{e:#}"));
                    }
                    enc = Some(e);
                }
                Err(e) => record("starting the servers", Err(e), &mut failures),
            }
        }
        if let (true, Some(lmdb)) = (want("postgres_server_post"), &enc) {
            let r = tokio::task::block_in_place(|| -> Result<Outcome> {
                let pg = testkit::pg::PgCluster::start();
                let provider = progressdb_e2e::Provider::External {
                    endpoint: kms.endpoint.clone(),
                    tls: None,
                };
                let on = scenarios::prepare(ServerRun::start_with(
                    &bins,
                    &root.join("server-postgres"),
                    &provider,
                    true,
                    Some(&pg.new_database()),
                )?)?;
                let o = scenarios::postgres_server_post(&env, &on, lmdb, &kms);
                on.run.stop()?;
                drop(pg);
                o
            });
            record("postgres_server_post", r, &mut failures);
        }
        if want("replicas_create") || want("replicas_server_post") {
            let r = async {
                let pg = tokio::task::block_in_place(testkit::pg::PgCluster::start);
                let (reps, spread) =
                    procs::start_replicas(&bins, &root.join("replicas"), &pg).await?;
                let create = scenarios::replicas_create_dek(&env, &kms, &reps, &spread).await;
                let post = match &enc {
                    Some(single) if want("replicas_server_post") => {
                        Some(tokio::task::block_in_place(|| -> Result<Outcome> {
                            let provider = progressdb_e2e::Provider::Replicas {
                                endpoints: reps.iter().map(|k| k.endpoint.clone()).collect(),
                            };
                            let on = scenarios::prepare(ServerRun::start_on(
                                &bins,
                                &root.join("server-replicas"),
                                &provider,
                                true,
                            )?)?;
                            let o = scenarios::replicas_server_post(&env, &on, single, &reps, &kms);
                            on.run.stop()?;
                            o
                        }))
                    }
                    _ => None,
                };
                for k in reps {
                    k.stop()?;
                }
                tokio::task::block_in_place(move || drop(pg));
                Ok::<_, anyhow::Error>((create, post))
            }
            .await;
            match r {
                Ok((create, post)) => {
                    if want("replicas_create") {
                        record("replicas_create_dek", create, &mut failures);
                    }
                    if let Some(post) = post {
                        record("replicas_server_post", post, &mut failures);
                    }
                }
                Err(e) => record("replicas", Err(e), &mut failures),
            }
        }
        let scale = p.scale();
        if let Some(e) = &enc {
            if want("thread_dek_rotation") {
                let r = scenarios::thread_rotation(&env, e, &kms, scale.rotation_messages).await;
                record("thread_dek_rotation", r, &mut failures);
            }
        }
        if want("kek_rewrap") {
            let r = scenarios::kek_rewrap(&env, &kms, scale.rewrap_deks).await;
            record("kek_rewrap", r, &mut failures);
        }
        if want("memory") {
            let r = memory(&env, &bins, &root, scale.kms_keys).await;
            let r = r.and_then(|mut o| {
                if let Some(e) = &enc {
                    tokio::task::block_in_place(|| -> Result<()> {
                        scenarios::fill_server(e, scale.server_messages)?;
                        let n = e.posted.load(std::sync::atomic::Ordering::Relaxed);
                        o.memory.push(scenarios::server_memory(e, n)?);
                        Ok(())
                    })?;
                }
                Ok(o)
            });
            record("memory", r, &mut failures);
        }
        if let Some(e) = enc {
            if let Err(e) = tokio::task::block_in_place(|| e.run.stop()) {
                failures.push(format!("{e:#}"));
            }
        }
        if let Err(e) = kms.stop() {
            failures.push(format!("{e:#}"));
        }
    });

    let meta = report::Meta {
        date: utc_now(),
        commit: commit(),
        cpu_model: cpu_model(),
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        softhsm: format!("SoftHSM {}", softhsm_version()),
        quick: p.quick,
        store_dir: base.display().to_string(),
        total_s: started.elapsed().as_secs_f64(),
        load_before,
        load_after: loadavg(),
        rounds: p.rounds(),
        budget_s: p.limits(1).per_round(p.rounds()).budget.as_secs_f64(),
    };
    let md = report::markdown(&meta, &outcomes, &failures);
    match &args.out {
        Some(prefix) => {
            let md_path = prefix.with_extension("md");
            let kept = std::fs::read_to_string(&md_path)
                .ok()
                .and_then(|old| old.find(report::MARKER).map(|i| old[..i].to_owned()))
                .unwrap_or_else(|| "# Benchmarks\n\n".to_owned());
            let head = if kept.ends_with('\n') {
                kept
            } else {
                format!("{kept}\n")
            };
            std::fs::write(&md_path, format!("{head}{}\n\n{md}", report::MARKER))
                .with_context(|| format!("writing {}", md_path.display()))?;
            let js = serde_json::to_string_pretty(&report::json(&meta, &outcomes, &failures))?;
            let json_path = prefix.with_extension("json");
            std::fs::write(&json_path, js + "\n")
                .with_context(|| format!("writing {}", json_path.display()))?;
            eprintln!("wrote {} and {}", md_path.display(), json_path.display());
        }
        None => print!("{md}"),
    }
    let ok = failures.is_empty();
    if !ok {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        let kept = tmp.keep();
        eprintln!("progressdb-bench: logs kept in {}", kept.display());
    }
    Ok(ok)
}

fn scenarios_raw(token: &procs::KmsPrepared) -> Result<hsm_raw::RawHsm> {
    let raw = hsm_raw::RawHsm::open(
        &token.hsm.module.display().to_string(),
        &token.hsm.label,
        &token.hsm.pin,
        progressdb_e2e::KEK_LABEL,
    )?;
    raw.open_sessions(scenarios::KMS_HSM_SESSIONS)?;
    Ok(raw)
}

/// Peak RSS of a KMS holding few records and one holding `n`, after the same workload.
async fn memory(env: &Env, bins: &Path, root: &Path, n: usize) -> Result<Outcome> {
    let mut figures = Vec::new();
    let small = (n / 100).max(1_000);
    for (name, count) in [("small", small), ("large", n)] {
        let prepared = prepare_kms(bins, &root.join(format!("kms-mem-{name}")))?;
        let kek = KekId::parse(progressdb_e2e::KEK_LABEL)?;
        eprintln!("  planting {count} key records");
        let sample = scenarios::plant(&prepared.store_dir(), &kek, count).await?;
        let kms = spawn_kms(
            bins,
            prepared,
            &[("PROGRESSDB_KMS__STORE__MAP_SIZE_MB", "4096")],
        )
        .await?;
        let m = scenarios::kms_memory_workload(env, &kms, Arc::new(sample), count).await;
        kms.stop()?;
        figures.push(m?);
    }
    let row = measure::Row::single(0, std::time::Duration::from_secs(1));
    let mut o = Outcome {
        id: "memory".into(),
        title: "memory".into(),
        unit: "",
        system: row,
        limits: Vec::new(),
        target: None,
        round_range: None,
        memory: figures,
        notes: Vec::new(),
    };
    if let [a, b] = &o.memory[..] {
        o.notes.push(format!(
            "the KMS's anonymous (heap) memory with {} records is {:.2}× its size with {}: \
             flat when near 1 (the cache bound, not the store, sizes the heap); file-backed \
             pages are the store's mapped LMDB pages, which the kernel reclaims under pressure",
            b.records,
            b.rss_anon_kib as f64 / a.rss_anon_kib.max(1) as f64,
            a.records
        ));
    }
    Ok(o)
}

/// The 1-minute load average (other processes competing for the CPUs skew every figure).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn softhsm_version() -> String {
    command_line("softhsm2-util", &["--version"]).unwrap_or_else(|| "unknown".into())
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn commit() -> String {
    std::env::var("BENCH_COMMIT")
        .ok()
        .or_else(|| command_line("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into())
}

fn utc_now() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
