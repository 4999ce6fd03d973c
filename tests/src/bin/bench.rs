//! `progressdb-bench`: throughput of the HSM backend, the KMS and the server, on loopback.
//!
//! ```text
//! cargo run --release -p progressdb-e2e --bin progressdb-bench -- [--quick] [--only a,b,c,d] [--dir DIR]
//! ```
//!
//! It makes its own SoftHSM tokens, LMDB stores and sockets under a temporary directory
//! (in `DIR`, default the system temp dir; put it on the disk you care about, since the stores
//! fsync), runs every measurement for a bounded number of operations **and** a bounded time,
//! prints one table and the ratios between rows of that same run, and removes its files.
//!
//! * **a** HSM in-process: DEK generate+wrap and unwrap through `Pkcs11Backend` (dedicated
//!   worker threads owning sessions) at concurrency 1 and 8, and the same unwrap workload
//!   dispatched with `tokio::task::spawn_blocking` over a `Mutex<Vec<Session>>` pool.
//! * **b** AES-256-GCM of a 256-byte message in-process (ring) vs KMS `/encrypt` over the Unix
//!   socket (concurrency 1 and 16) vs `/encrypt_batch` with 64 items.
//! * **c** KMS `/create_dek_for_thread` at concurrency 1 and 32, with the key store's writes
//!   per commit read from `/metrics` (group commit).
//! * **d** Server: POST message and GET page (50) through `progressdb` with the external KMS
//!   over the Unix socket, concurrency 1 and 16, with encryption on and off.
//!
//! Sections b (KMS part), c and d start the real binaries: `E2E_BIN_DIR` if set, else the
//! directory of this executable (so `cargo build --release -p progressdb-kms -p progressdb
//! --bins` is picked up), else `target/e2e/` (scripts/test.sh, debug builds). The child
//! processes log at `BENCH_CHILD_LOG` (default `warn`); their logs are in the temp dir, which
//! is kept when a section fails.
//!
//! `--quick` makes every measurement tiny (a CI smoke run of well under 20 s); its figures
//! only show that the paths work.

use std::future::Future;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::types::Ulong;
use kms_api::client::{Endpoint, KmsClient, KmsClientConfig};
use kms_api::wire::Bytes64;
use kms_api::wire::{EncryptRequest, ItemResult, SecretBytes};
use kms_api::{KekId, KeyId, ThreadId, WrappedDek};
use progressdb_e2e::{
    kms_config, server_config, Api, KmsListen, Proc, Provider, Role, Server, SoftHsm,
};
use progressdb_kms::backend::pkcs11::{init_kek, Pkcs11Backend};
use progressdb_kms::backend::{parse_wrapped_header, wrap_aad, HsmSettings, KekRef, KeyBackend};
use rand::RngCore as _;
use secrecy::SecretString;
use serde_json::{json, Value};
use zeroize::Zeroizing;

const USAGE: &str = "usage: progressdb-bench [--quick] [--only a,b,c,d] [--dir DIR]";
/// Sessions of the in-process backend and of the spawn_blocking pool (section a).
const HSM_SESSIONS: usize = 8;
const MESSAGE_BYTES: usize = 256;
const BATCH_ITEMS: usize = 64;
const PAGE: usize = 50;

// ---------------------------------------------------------------------------------------------
// Command line, profile, report

struct Args {
    quick: bool,
    only: Vec<char>,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        only: vec!['a', 'b', 'c', 'd'],
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--only" => {
                let v = it
                    .next()
                    .ok_or_else(|| anyhow!("--only needs a value\n{USAGE}"))?;
                args.only = v
                    .split(',')
                    .filter_map(|s| s.trim().chars().next())
                    .collect();
                if let Some(bad) = args.only.iter().find(|c| !"abcd".contains(**c)) {
                    bail!("unknown section {bad:?}\n{USAGE}");
                }
            }
            "--dir" => {
                let v = it
                    .next()
                    .ok_or_else(|| anyhow!("--dir needs a value\n{USAGE}"))?;
                args.dir = Some(PathBuf::from(v));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

/// How long and how many: every measurement stops at whichever limit comes first.
#[derive(Clone, Copy)]
struct Limits {
    max_ops: usize,
    budget: Duration,
    warmup: usize,
}

#[derive(Clone, Copy)]
struct Profile {
    quick: bool,
}

impl Limits {
    /// The share of these limits for one of `n` interleaved rounds.
    fn per_round(self, n: usize) -> Limits {
        let n = n.max(1);
        Limits {
            max_ops: (self.max_ops / n).max(1),
            budget: self.budget / n as u32,
            warmup: self.warmup,
        }
    }
}

impl Profile {
    /// Interleaved rounds for A/B comparisons, so drift and background load hit both sides.
    fn rounds(self) -> usize {
        if self.quick {
            1
        } else {
            6
        }
    }

    /// Limits for a workload whose full run may do up to `full_ops` calls.
    fn limits(self, full_ops: usize) -> Limits {
        if self.quick {
            Limits {
                max_ops: (full_ops / 100).clamp(16, 200),
                budget: Duration::from_millis(250),
                warmup: 4,
            }
        } else {
            Limits {
                max_ops: full_ops,
                budget: Duration::from_secs(3),
                warmup: 32,
            }
        }
    }
}

/// One measured workload.
struct Row {
    section: &'static str,
    name: String,
    conc: usize,
    calls: usize,
    items: usize,
    elapsed: Duration,
    /// Per-call latencies, sorted.
    lat: Vec<Duration>,
}

impl Row {
    /// Items (DEKs, messages, pages) per second.
    fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn p50(&self) -> Duration {
        percentile(&self.lat, 50)
    }

    fn p99(&self) -> Duration {
        percentile(&self.lat, 99)
    }

    /// One row from several rounds of the same workload: calls, items and time add up.
    fn merge(rounds: Vec<Row>) -> Result<Row> {
        let mut it = rounds.into_iter();
        let mut acc = it.next().ok_or_else(|| anyhow!("no rounds"))?;
        for r in it {
            acc.calls += r.calls;
            acc.items += r.items;
            acc.elapsed += r.elapsed;
            acc.lat.extend(r.lat);
        }
        acc.lat.sort_unstable();
        Ok(acc)
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    ratios: Vec<(String, String)>,
    notes: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn push(&mut self, row: Row) -> f64 {
        let r = row.rate();
        eprintln!(
            "  [{}] {:<44} c={:<3} {:>10.0}/s",
            row.section, row.name, row.conc, r
        );
        self.rows.push(row);
        r
    }

    fn ratio(&mut self, what: &str, num: f64, den: f64) {
        let v = if den > 0.0 { num / den } else { f64::NAN };
        self.ratios.push((what.to_owned(), format!("{v:.2}x")));
    }

    /// A ratio of two interleaved workloads, with the range of the per-round ratios.
    fn ratio_rounds(&mut self, what: &str, num: f64, den: f64, range: Option<(f64, f64)>) {
        let v = if den > 0.0 { num / den } else { f64::NAN };
        let text = match range {
            Some((lo, hi)) => format!("{v:.2}x (rounds {lo:.2}–{hi:.2})"),
            None => format!("{v:.2}x"),
        };
        self.ratios.push((what.to_owned(), text));
    }

    fn print(&self, header: &[String]) {
        let mut out = String::new();
        for h in header {
            out.push_str(&format!("# {h}\n"));
        }
        out.push_str(
            "\n| sec | workload | conc | calls | items | time s | items/s | p50 ms | p99 ms |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.3} | {:.0} | {:.3} | {:.3} |\n",
                r.section,
                r.name,
                r.conc,
                r.calls,
                r.items,
                r.elapsed.as_secs_f64(),
                r.rate(),
                r.p50().as_secs_f64() * 1e3,
                r.p99().as_secs_f64() * 1e3
            ));
        }
        if !self.ratios.is_empty() {
            out.push_str("\n| ratio (same run) | value |\n|---|---:|\n");
            for (k, v) in &self.ratios {
                out.push_str(&format!("| {k} | {v} |\n"));
            }
        }
        for n in &self.notes {
            out.push_str(&format!("\nnote: {n}"));
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        for f in &self.failures {
            out.push_str(&format!("\nFAILED: {f}\n"));
        }
        let mut so = std::io::stdout().lock();
        // Nothing useful to do if stdout is gone.
        let _ = so.write_all(out.as_bytes());
        let _ = so.flush();
    }
}

/// Smallest and largest ratio of rates between paired rounds of two interleaved workloads.
fn round_range(num: &[Row], den: &[Row]) -> Option<(f64, f64)> {
    if num.len() < 2 {
        return None;
    }
    let rs: Vec<f64> = num
        .iter()
        .zip(den)
        .map(|(a, b)| a.rate() / b.rate().max(1e-9))
        .collect();
    let lo = rs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo, hi))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted.get(idx).copied().unwrap_or_default()
}

fn finish_row(
    section: &'static str,
    name: &str,
    conc: usize,
    items_per_call: usize,
    elapsed: Duration,
    mut lat: Vec<Duration>,
) -> Result<Row> {
    if lat.is_empty() {
        bail!("{name}: no operation completed");
    }
    lat.sort_unstable();
    Ok(Row {
        section,
        name: name.to_owned(),
        conc,
        calls: lat.len(),
        items: lat.len() * items_per_call,
        elapsed,
        lat,
    })
}

// ---------------------------------------------------------------------------------------------
// Runners

/// Runs `f(worker, op)` from `conc` tasks until `lim.max_ops` calls were started or the time
/// budget is spent. The first error stops the measurement.
async fn run_async<F, Fut>(
    section: &'static str,
    name: &str,
    conc: usize,
    lim: Limits,
    items_per_call: usize,
    f: F,
) -> Result<Row>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    for i in 0..lim.warmup {
        f(i % conc.max(1), usize::MAX - i)
            .await
            .with_context(|| format!("{name}: warm-up"))?;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + lim.budget;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..conc {
        let f = Arc::clone(&f);
        let next = Arc::clone(&next);
        set.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= lim.max_ops || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                f(w, i).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = set.join_next().await {
        lat.extend(
            r.context("benchmark task")?
                .with_context(|| name.to_owned())?,
        );
    }
    finish_row(section, name, conc, items_per_call, start.elapsed(), lat)
}

/// [`run_async`] for blocking closures on `conc` OS threads.
fn run_threads<F>(
    section: &'static str,
    name: &str,
    conc: usize,
    lim: Limits,
    items_per_call: usize,
    f: F,
) -> Result<Row>
where
    F: Fn(usize, usize) -> Result<()> + Sync,
{
    for i in 0..lim.warmup {
        f(i % conc.max(1), usize::MAX - i).with_context(|| format!("{name}: warm-up"))?;
    }
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + lim.budget;
    let lat = std::thread::scope(|s| -> Result<Vec<Duration>> {
        let handles: Vec<_> = (0..conc)
            .map(|w| {
                let (f, next) = (&f, &next);
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= lim.max_ops || Instant::now() >= deadline {
                            break;
                        }
                        let t = Instant::now();
                        f(w, i)?;
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let part = h
                .join()
                .map_err(|_| anyhow!("{name}: a benchmark thread panicked"))?
                .with_context(|| name.to_owned())?;
            all.extend(part);
        }
        Ok(all)
    })?;
    finish_row(section, name, conc, items_per_call, start.elapsed(), lat)
}

// ---------------------------------------------------------------------------------------------
// Harness glue (the e2e harness panics on failure; turn that into errors)

fn harness<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into());
        anyhow!("{what}: {msg}")
    })
}

/// Where the binaries under test are: `E2E_BIN_DIR`, this executable's directory, or
/// `<target>/e2e`. Exported as `E2E_BIN_DIR` so the harness finds them too.
fn resolve_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("E2E_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    if let Some(d) = &exe_dir {
        if d.join("progressdb-kms").is_file() && d.join("progressdb").is_file() {
            return d.clone();
        }
    }
    exe_dir
        .and_then(|d| d.parent().map(|t| t.join("e2e")))
        .unwrap_or_else(|| PathBuf::from("target/e2e"))
}

fn need_bins(dir: &Path, names: &[&str]) -> Result<()> {
    for n in names {
        if !dir.join(n).is_file() {
            bail!(
                "{n} not found in {}: build it first with \
                 `cargo build --release -p progressdb-kms -p progressdb --bins` \
                 (or scripts/test.sh, or set E2E_BIN_DIR)",
                dir.display()
            );
        }
    }
    Ok(())
}

fn child_log() -> String {
    std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn exited(proc: &mut Proc) -> Option<String> {
    let child = proc.child.as_mut()?;
    match child.try_wait() {
        Ok(Some(st)) => Some(format!(
            "{} exited with {st}; last log lines:\n{}",
            proc.name,
            log_tail(&proc.log)
        )),
        _ => None,
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn random_key_id() -> KeyId {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    KeyId::from_random(b)
}

// ---------------------------------------------------------------------------------------------
// Section a: the PKCS#11 backend in-process

/// The comparison point for the worker threads: sessions in a `Mutex<Vec<Session>>`, checked
/// out by closures run with `spawn_blocking`. Same token, same KEK, same `C_Decrypt`.
struct BlockingPool {
    _pkcs11: Pkcs11,
    sessions: Mutex<Vec<(Session, ObjectHandle)>>,
    returned: Condvar,
    kek: KekRef,
}

impl BlockingPool {
    fn open(token_label: &str, pin: SecretString, kek: KekRef, n: usize) -> Result<Self> {
        let pkcs11 =
            Pkcs11::new(progressdb_e2e::SOFTHSM_MODULE).context("loading the PKCS#11 module")?;
        // The backend initialised the library in this process already; that is fine.
        match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e).context("C_Initialize"),
        }
        let mut slot = None;
        for s in pkcs11.get_slots_with_token()? {
            if pkcs11.get_token_info(s)?.label().trim_end() == token_label {
                slot = Some(s);
            }
        }
        let slot = slot.ok_or_else(|| anyhow!("token {token_label} not found"))?;
        let template = [
            Attribute::Token(true),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(kek.id.as_str().as_bytes().to_vec()),
            Attribute::Id(kek.version.get().to_be_bytes().to_vec()),
        ];
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            let s = pkcs11.open_ro_session(slot)?;
            if !matches!(
                s.get_session_info()?.session_state(),
                SessionState::RoUser | SessionState::RwUser
            ) {
                match s.login(UserType::User, Some(&pin)) {
                    Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                    Err(e) => return Err(e).context("C_Login"),
                }
            }
            let h = *s
                .find_objects(&template)?
                .first()
                .ok_or_else(|| anyhow!("KEK not found"))?;
            sessions.push((s, h));
        }
        Ok(Self {
            _pkcs11: pkcs11,
            sessions: Mutex::new(sessions),
            returned: Condvar::new(),
            kek,
        })
    }

    /// Blocking: checks a session out (waiting if none is free), decrypts, checks it back in.
    fn unwrap(&self, key_id: &KeyId, wrapped: &WrappedDek) -> Result<Zeroizing<Vec<u8>>> {
        let (session, kek_handle) = {
            let mut g = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(s) = g.pop() {
                    break s;
                }
                g = self
                    .returned
                    .wait(g)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let res = (|| {
            parse_wrapped_header(wrapped)?;
            let b = wrapped.as_bytes();
            let mut iv = [0u8; 12];
            iv.copy_from_slice(b.get(5..17).ok_or_else(|| anyhow!("short blob"))?);
            let ct = b.get(17..).ok_or_else(|| anyhow!("short blob"))?;
            let aad = wrap_aad(key_id, &self.kek);
            let params = GcmParams::new(&mut iv, &aad, Ulong::new(128))?;
            let plain =
                Zeroizing::new(session.decrypt(&Mechanism::AesGcm(params), kek_handle, ct)?);
            if plain.len() != 32 {
                bail!("unwrapped DEK has {} bytes", plain.len());
            }
            Ok(plain)
        })();
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((session, kek_handle));
        self.returned.notify_one();
        res
    }
}

async fn section_a(p: Profile, root: &Path, rep: &mut Report) -> Result<()> {
    eprintln!("section a: HSM in-process ({HSM_SESSIONS} sessions)");
    let hsm = harness("creating the SoftHSM token", || SoftHsm::new(root))?;
    let settings = HsmSettings {
        module: PathBuf::from(progressdb_e2e::SOFTHSM_MODULE),
        token_label: hsm.token_label.clone(),
        pin: SecretString::from(hsm.pin.clone()),
        kek_label: KekId::parse(&hsm.kek_label)?,
        audit_key_label: format!("{}-audit", hsm.kek_label),
        sessions: HSM_SESSIONS,
        limits: Default::default(),
    };
    let backend = tokio::task::spawn_blocking(move || -> Result<Pkcs11Backend> {
        init_kek(&settings)?;
        Ok(Pkcs11Backend::open(settings)?)
    })
    .await??;
    let backend = Arc::new(backend);

    let mut gen = [0.0; 2];
    for (k, conc) in [1usize, 8].into_iter().enumerate() {
        let b = Arc::clone(&backend);
        let row = run_async(
            "a",
            "DEK generate+wrap (workers)",
            conc,
            p.limits(20_000),
            1,
            move |_, _| {
                let b = Arc::clone(&b);
                async move {
                    b.generate_dek(&random_key_id()).await?;
                    Ok(())
                }
            },
        )
        .await?;
        gen[k] = rep.push(row);
    }

    // A fixed set of wrapped DEKs to unwrap, round robin.
    let mut set = Vec::new();
    for _ in 0..64 {
        let id = random_key_id();
        let (_, wrapped, kek) = backend.generate_dek(&id).await?;
        set.push((id, wrapped, kek));
    }
    let set = Arc::new(set);
    let kek = backend.current_kek();

    let pool = {
        let (label, pin) = (hsm.token_label.clone(), SecretString::from(hsm.pin.clone()));
        tokio::task::spawn_blocking(move || BlockingPool::open(&label, pin, kek, HSM_SESSIONS))
            .await??
    };
    let pool = Arc::new(pool);

    // Workers and spawn_blocking alternate in rounds, so drift and background load hit both.
    let rounds = p.rounds();
    let lim = p.limits(50_000).per_round(rounds);
    let mut workers = [0.0; 2];
    let mut blocking = [0.0; 2];
    let mut ranges = [None; 2];
    for (k, conc) in [1usize, 8].into_iter().enumerate() {
        let (mut w_rows, mut b_rows) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (b, s) = (Arc::clone(&backend), Arc::clone(&set));
            w_rows.push(
                run_async("a", "DEK unwrap (workers)", conc, lim, 1, move |_, i| {
                    let (b, s) = (Arc::clone(&b), Arc::clone(&s));
                    async move {
                        let (id, wrapped, kek) =
                            s.get(i % s.len()).ok_or_else(|| anyhow!("empty set"))?;
                        b.unwrap_dek(id, &kek.id, wrapped).await?;
                        Ok(())
                    }
                })
                .await?,
            );
            let (pl, s) = (Arc::clone(&pool), Arc::clone(&set));
            b_rows.push(
                run_async(
                    "a",
                    "DEK unwrap (spawn_blocking + Mutex<Vec<Session>>)",
                    conc,
                    lim,
                    1,
                    move |_, i| {
                        let (pl, s) = (Arc::clone(&pl), Arc::clone(&s));
                        async move {
                            tokio::task::spawn_blocking(move || {
                                let (id, wrapped, _) =
                                    s.get(i % s.len()).ok_or_else(|| anyhow!("empty set"))?;
                                pl.unwrap(id, wrapped).map(drop)
                            })
                            .await?
                        }
                    },
                )
                .await?,
            );
        }
        ranges[k] = round_range(&w_rows, &b_rows);
        workers[k] = rep.push(Row::merge(w_rows)?);
        blocking[k] = rep.push(Row::merge(b_rows)?);
    }
    rep.ratio_rounds(
        "a: unwrap workers / spawn_blocking, c=1",
        workers[0],
        blocking[0],
        ranges[0],
    );
    rep.ratio_rounds(
        "a: unwrap workers / spawn_blocking, c=8",
        workers[1],
        blocking[1],
        ranges[1],
    );
    rep.ratio("a: unwrap workers c=8 / c=1", workers[1], workers[0]);
    rep.ratio("a: generate+wrap c=8 / c=1", gen[1], gen[0]);
    let stats = backend.stats();
    if stats.errors > 0 {
        rep.notes.push(format!(
            "a: the backend counted {} HSM errors",
            stats.errors
        ));
    }
    drop(pool);
    drop(backend);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The KMS process (sections b, c, d)

struct KmsRun {
    proc: Proc,
    endpoint: String,
    client: KmsClient,
    _hsm: SoftHsm,
}

async fn start_kms(bins: &Path, root: &Path) -> Result<KmsRun> {
    need_bins(bins, &["progressdb-kms"])?;
    std::fs::create_dir_all(root)?;
    let hsm = harness("creating the SoftHSM token", || SoftHsm::new(root))?;
    let (config, endpoint) = harness("KMS config and init-kek", || {
        kms_config(root, &hsm, KmsListen::Unix, None)
    })?;
    let mut cmd = Command::new(bins.join("progressdb-kms"));
    cmd.env("SOFTHSM2_CONF", &hsm.conf)
        .env("RUST_LOG", child_log())
        .arg("serve")
        .arg("--config")
        .arg(&config);
    let mut proc = harness("starting progressdb-kms", || {
        Proc::spawn("progressdb-kms", cmd, &root.join("kms.log"))
    })?;
    let mut cfg = KmsClientConfig::new(Endpoint::from_str(&endpoint)?, None);
    cfg.max_idle = 64;
    let client = KmsClient::new(cfg)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(why) = exited(&mut proc) {
            bail!("{why}");
        }
        if client.ready().await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "progressdb-kms not ready within 30 s; last log lines:\n{}",
                log_tail(&proc.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(KmsRun {
        proc,
        endpoint,
        client,
        _hsm: hsm,
    })
}

/// Counter value `name` from a Prometheus/OpenMetrics text (sum over label sets).
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        found = Some(found.unwrap_or(0.0) + v);
    }
    found
}

async fn kms_metrics(client: &KmsClient) -> Result<String> {
    let (status, body) = client
        .raw(http::Method::GET, "/metrics", Vec::new())
        .await?;
    if status != 200 {
        bail!("KMS /metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Section b: AES-GCM in-process vs the KMS

fn section_b_inproc(p: Profile, rep: &mut Report) -> Result<f64> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    use ring::rand::{SecureRandom as _, SystemRandom};
    eprintln!("section b: AES-256-GCM in-process vs KMS");
    let key = Zeroizing::new(random_bytes(32));
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &key).map_err(|_| anyhow!("ring: bad key length"))?,
    );
    let rng = SystemRandom::new();
    let msg = random_bytes(MESSAGE_BYTES);
    let aad = b"thread:bench:msg:00000000000000000000-000000".to_vec();
    let mut lim = p.limits(2_000_000);
    if p.quick {
        lim.max_ops = 20_000;
    }
    // Same shape as the KMS's seal: random nonce, fresh output buffer.
    let row = run_threads(
        "b",
        "AES-256-GCM seal 256 B in-process (ring)",
        1,
        lim,
        1,
        |_, _| {
            let mut nonce = [0u8; 12];
            rng.fill(&mut nonce).map_err(|_| anyhow!("rng"))?;
            let mut out = Vec::with_capacity(12 + MESSAGE_BYTES + 16);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&msg);
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad[..]),
                    out.get_mut(12..).ok_or_else(|| anyhow!("buffer"))?,
                )
                .map_err(|_| anyhow!("seal"))?;
            out.extend_from_slice(tag.as_ref());
            std::hint::black_box(out);
            Ok(())
        },
    )?;
    Ok(rep.push(row))
}

async fn section_b_kms(p: Profile, kms: &KmsRun, ring_rate: f64, rep: &mut Report) -> Result<()> {
    let thread = ThreadId::parse("bench-b")?;
    let key_id = kms.client.create_dek_for_thread(&thread).await?.key_id;
    let msg = Arc::new(random_bytes(MESSAGE_BYTES));
    let aad = Arc::new(b"thread:bench-b:msg:00000000000000000000-000000".to_vec());

    let mut single = [0.0; 2];
    for (k, conc) in [1usize, 16].into_iter().enumerate() {
        let (c, id, m, a) = (
            kms.client.clone(),
            key_id.clone(),
            Arc::clone(&msg),
            Arc::clone(&aad),
        );
        let row = run_async(
            "b",
            "KMS /encrypt 256 B (UDS)",
            conc,
            p.limits(50_000),
            1,
            move |_, _| {
                let (c, id, m, a) = (c.clone(), id.clone(), Arc::clone(&m), Arc::clone(&a));
                async move {
                    c.encrypt(&id, &m, Some(&a)).await?;
                    Ok(())
                }
            },
        )
        .await?;
        single[k] = rep.push(row);
    }
    let items: Vec<EncryptRequest> = (0..BATCH_ITEMS)
        .map(|_| EncryptRequest {
            key_id: key_id.clone(),
            plaintext: SecretBytes::new(msg.to_vec()),
            aad: Some(Bytes64(aad.to_vec())),
        })
        .collect();
    let items = Arc::new(items);
    let mut batch = [0.0; 2];
    for (k, conc) in [1usize, 16].into_iter().enumerate() {
        let (c, it) = (kms.client.clone(), Arc::clone(&items));
        let row = run_async(
            "b",
            "KMS /encrypt_batch x64, 256 B each (UDS)",
            conc,
            p.limits(5_000),
            BATCH_ITEMS,
            move |_, _| {
                let (c, it) = (c.clone(), Arc::clone(&it));
                async move {
                    let res = c.encrypt_batch(it.as_ref()).await?;
                    if res.len() != BATCH_ITEMS
                        || res.iter().any(|r| matches!(r, ItemResult::Error(_)))
                    {
                        bail!("a batch item failed");
                    }
                    Ok(())
                }
            },
        )
        .await?;
        batch[k] = rep.push(row);
    }
    rep.ratio(
        "b: in-process ring / KMS /encrypt c=1",
        ring_rate,
        single[0],
    );
    rep.ratio(
        "b: in-process ring / KMS /encrypt c=16",
        ring_rate,
        single[1],
    );
    rep.ratio(
        "b: in-process ring / KMS /encrypt_batch x64 c=16",
        ring_rate,
        batch[1],
    );
    rep.ratio("b: /encrypt c=16 / c=1", single[1], single[0]);
    rep.ratio(
        "b: /encrypt_batch x64 / /encrypt, c=1 (items/s)",
        batch[0],
        single[0],
    );
    rep.ratio(
        "b: /encrypt_batch x64 / /encrypt, c=16 (items/s)",
        batch[1],
        single[1],
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Section c: DEK creation and the key store's group commit

async fn section_c(p: Profile, kms: &KmsRun, rep: &mut Report) -> Result<()> {
    eprintln!("section c: KMS create_dek_for_thread");
    let run = hex_id();
    let seq = Arc::new(AtomicUsize::new(0));
    let mut rates = [0.0; 2];
    let mut per_commit = [f64::NAN; 2];
    for (k, conc) in [1usize, 32].into_iter().enumerate() {
        let mut lim = p.limits(20_000);
        // Warm up outside the metrics window.
        for _ in 0..lim.warmup {
            let t = ThreadId::parse(&format!(
                "bench-c-{run}-w{}",
                seq.fetch_add(1, Ordering::Relaxed)
            ))?;
            kms.client.create_dek_for_thread(&t).await?;
        }
        lim.warmup = 0;
        let before = kms_metrics(&kms.client).await?;
        let (c, r, s) = (kms.client.clone(), run.clone(), Arc::clone(&seq));
        let row = run_async(
            "c",
            "KMS /create_dek_for_thread (UDS)",
            conc,
            lim,
            1,
            move |_, _| {
                let (c, r, s) = (c.clone(), r.clone(), Arc::clone(&s));
                async move {
                    let t = ThreadId::parse(&format!(
                        "bench-c-{r}-{}",
                        s.fetch_add(1, Ordering::Relaxed)
                    ))?;
                    c.create_dek_for_thread(&t).await?;
                    Ok(())
                }
            },
        )
        .await?;
        let after = kms_metrics(&kms.client).await?;
        let d = |name: &str| Some(metric(&after, name)? - metric(&before, name)?);
        if let (Some(w), Some(cm)) = (
            d("progressdb_kms_keystore_writes_total"),
            d("progressdb_kms_keystore_commits_total"),
        ) {
            if cm > 0.0 {
                per_commit[k] = w / cm;
            }
        }
        rates[k] = rep.push(row);
    }
    rep.ratio("c: create_dek c=32 / c=1", rates[1], rates[0]);
    for (k, conc) in [1, 32].into_iter().enumerate() {
        if per_commit[k].is_nan() {
            rep.notes.push(format!(
                "c: key-store writes per commit at c={conc}: not available from /metrics"
            ));
        } else {
            rep.ratios.push((
                format!("c: key-store writes per fsynced commit, c={conc}"),
                format!("{:.1}", per_commit[k]),
            ));
        }
    }
    Ok(())
}

fn hex_id() -> String {
    random_bytes(4).iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Section d: the server

struct ServerRun {
    server: Server,
    agent: ureq::Agent,
}

impl ServerRun {
    fn start(bins: &Path, root: &Path, kms_endpoint: &str, encryption: bool) -> Result<Self> {
        need_bins(bins, &["progressdb"])?;
        std::fs::create_dir_all(root)?;
        let port = progressdb_e2e::free_port();
        let provider = Provider::External {
            endpoint: kms_endpoint.to_owned(),
            tls: None,
        };
        let (config, keys, store) = harness("server config", || {
            server_config(root, &provider, encryption, port)
        })?;
        let binary = bins.join("progressdb");
        let mut cmd = Command::new(&binary);
        cmd.env("RUST_LOG", child_log())
            .arg("serve")
            .arg("--config")
            .arg(&config);
        let proc = harness("starting progressdb", || {
            Proc::spawn("progressdb", cmd, &root.join("server.log"))
        })?;
        let mut run = Self {
            server: Server {
                proc,
                config,
                base: format!("http://127.0.0.1:{port}"),
                keys,
                store,
                root: root.to_owned(),
                binary,
            },
            agent: ureq::AgentBuilder::new()
                .max_idle_connections(64)
                .max_idle_connections_per_host(64)
                .timeout(Duration::from_secs(30))
                .build(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(why) = exited(&mut run.server.proc) {
                bail!("{why}");
            }
            if let Ok(r) = run.agent.get(&format!("{}/readyz", run.server.base)).call() {
                if r.status() == 200 {
                    return Ok(run);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "progressdb not ready within 30 s; last log lines:\n{}",
                    log_tail(&run.server.proc.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request as `api`; fails unless the status is `want`.
    fn call(
        &self,
        api: &Api,
        method: &str,
        path: &str,
        body: Option<&Value>,
        want: u16,
    ) -> Result<Value> {
        let (status, text) = api
            .send(&self.agent, method, path, body)
            .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
        if status != want {
            bail!("{method} {path}: status {status}, body {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    fn stop(mut self) -> Result<()> {
        harness("stopping progressdb", || self.server.proc.sigterm()).map(drop)
    }
}

/// A running server prepared for the workloads: 16 threads to post into, and one thread with
/// a full page of messages to read.
struct Prepared {
    run: ServerRun,
    label: &'static str,
    api: Api,
    threads: Vec<String>,
    page_path: String,
}

fn prepare(run: ServerRun, label: &'static str) -> Result<Prepared> {
    let api = run.server.as_role(Role::Frontend, "bench-user");
    let new_thread = |title: String| -> Result<String> {
        let t = run.call(
            &api,
            "POST",
            "/v1/threads",
            Some(&json!({ "title": title })),
            201,
        )?;
        t["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("thread without id: {t}"))
    };
    let threads = (0..16)
        .map(|i| new_thread(format!("bench {i}")))
        .collect::<Result<Vec<_>>>()?;
    let page_thread = new_thread("bench page".into())?;
    for i in 0..PAGE {
        post_message(&run, &api, &page_thread, i)?;
    }
    let page_path = format!("/v1/threads/{page_thread}/messages?limit={PAGE}&order=desc");
    let first = run.call(&api, "GET", &page_path, None, 200)?;
    let n = first["messages"].as_array().map_or(0, Vec::len);
    if n != PAGE {
        bail!("GET page returned {n} messages, expected {PAGE}");
    }
    Ok(Prepared {
        run,
        label,
        api,
        threads,
        page_path,
    })
}

fn post_message(run: &ServerRun, api: &Api, thread: &str, n: usize) -> Result<()> {
    let text = "x".repeat(MESSAGE_BYTES);
    run.call(
        api,
        "POST",
        &format!("/v1/threads/{thread}/messages"),
        Some(&json!({ "body": { "text": text, "n": n } })),
        201,
    )
    .map(drop)
}

#[derive(Clone, Copy)]
enum Workload {
    Post,
    GetPage,
}

fn measure(s: &Prepared, w: Workload, conc: usize, lim: Limits) -> Result<Row> {
    match w {
        Workload::Post => run_threads(
            "d",
            &format!("server POST message 256 B, {}", s.label),
            conc,
            lim,
            1,
            |worker, i| {
                let t = s
                    .threads
                    .get(worker % s.threads.len())
                    .ok_or_else(|| anyhow!("no thread"))?;
                post_message(&s.run, &s.api, t, i)
            },
        ),
        Workload::GetPage => run_threads(
            "d",
            &format!("server GET page of {PAGE} (item = page), {}", s.label),
            conc,
            lim,
            1,
            |_, _| s.run.call(&s.api, "GET", &s.page_path, None, 200).map(drop),
        ),
    }
}

fn section_d(p: Profile, bins: &Path, root: &Path, kms: &KmsRun, rep: &mut Report) -> Result<()> {
    eprintln!("section d: server (external KMS over UDS), encrypted vs plain, interleaved");
    let enc = ServerRun::start(bins, &root.join("server-encrypted"), &kms.endpoint, true)?;
    let plain = ServerRun::start(bins, &root.join("server-plain"), &kms.endpoint, false)?;
    let servers = [prepare(enc, "encrypted")?, prepare(plain, "plain")?];
    let rounds = p.rounds();
    // rates[workload][conc][server]
    let mut rates = [[[0.0; 2]; 2]; 2];
    let mut ranges = [[None; 2]; 2];
    for (wi, (w, full_ops)) in [(Workload::Post, 20_000), (Workload::GetPage, 10_000)]
        .into_iter()
        .enumerate()
    {
        let lim = p.limits(full_ops).per_round(rounds);
        for (ci, conc) in [1usize, 16].into_iter().enumerate() {
            let mut rows: [Vec<Row>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..rounds {
                for (si, s) in servers.iter().enumerate() {
                    if let Some(v) = rows.get_mut(si) {
                        v.push(measure(s, w, conc, lim)?);
                    }
                }
            }
            let [enc_rows, plain_rows] = rows;
            ranges[wi][ci] = round_range(&enc_rows, &plain_rows);
            rates[wi][ci][0] = rep.push(Row::merge(enc_rows)?);
            rates[wi][ci][1] = rep.push(Row::merge(plain_rows)?);
        }
    }
    for s in servers {
        s.run.stop()?;
    }
    let [post, get] = rates;
    let [post_r, get_r] = ranges;
    rep.ratio_rounds(
        "d: POST encrypted / plain, c=1",
        post[0][0],
        post[0][1],
        post_r[0],
    );
    rep.ratio_rounds(
        "d: POST encrypted / plain, c=16",
        post[1][0],
        post[1][1],
        post_r[1],
    );
    rep.ratio_rounds(
        "d: GET page encrypted / plain, c=1",
        get[0][0],
        get[0][1],
        get_r[0],
    );
    rep.ratio_rounds(
        "d: GET page encrypted / plain, c=16",
        get[1][0],
        get[1][1],
        get_r[1],
    );
    rep.ratio("d: POST encrypted c=16 / c=1", post[1][0], post[0][0]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn softhsm_version() -> String {
    Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("progressdb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<bool> {
    let args = parse_args()?;
    let p = Profile { quick: args.quick };
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("progressdb-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))?;
    let root = tmp.path().to_path_buf();
    let bins = resolve_bin_dir();
    // Before any thread exists: the in-process PKCS#11 library reads SOFTHSM2_CONF once, and
    // the harness looks the binaries up through E2E_BIN_DIR.
    std::env::set_var("SOFTHSM2_CONF", root.join("a/softhsm/softhsm2.conf"));
    std::env::set_var("E2E_BIN_DIR", &bins);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let started = Instant::now();
    let load_before = loadavg();
    let mut rep = Report::default();
    let want = |c: char| args.only.contains(&c);

    rt.block_on(async {
        if want('a') {
            if let Err(e) = section_a(p, &root.join("a"), &mut rep).await {
                rep.failures.push(format!("section a: {e:#}"));
            }
        }
        let mut ring_rate = None;
        if want('b') {
            match section_b_inproc(p, &mut rep) {
                Ok(r) => ring_rate = Some(r),
                Err(e) => rep.failures.push(format!("section b (in-process): {e:#}")),
            }
        }
        if !(want('b') || want('c') || want('d')) {
            return;
        }
        let kms = match start_kms(&bins, &root.join("kms")).await {
            Ok(k) => k,
            Err(e) => {
                rep.failures.push(format!(
                    "sections {} need the KMS: {e:#}",
                    ['b', 'c', 'd']
                        .iter()
                        .filter(|c| want(**c))
                        .map(char::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                return;
            }
        };
        if let Some(r) = ring_rate {
            if let Err(e) = section_b_kms(p, &kms, r, &mut rep).await {
                rep.failures.push(format!("section b (KMS): {e:#}"));
            }
        }
        if want('c') {
            if let Err(e) = section_c(p, &kms, &mut rep).await {
                rep.failures.push(format!("section c: {e:#}"));
            }
        }
        if want('d') {
            // Blocking HTTP clients on their own threads; keep the runtime free for nothing else.
            let r = tokio::task::block_in_place(|| section_d(p, &bins, &root, &kms, &mut rep));
            if let Err(e) = r {
                rep.failures.push(format!("section d: {e:#}"));
            }
        }
        let mut kms = kms;
        if let Err(e) = harness("stopping progressdb-kms", || kms.proc.sigterm()) {
            rep.notes.push(format!("{e:#}"));
        }
    });

    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let header = vec![
        format!(
            "progressdb-bench{} — {cpus} CPUs, {}, binaries from {}",
            if p.quick {
                " --quick (smoke run: figures are not meaningful)"
            } else {
                ""
            },
            softhsm_version_line(),
            bins.display()
        ),
        format!(
            "stores and tokens under {} (fsync is real unless that is tmpfs); total {:.1} s",
            base.display(),
            started.elapsed().as_secs_f64()
        ),
        format!(
            "each row stops at its op cap or after {:.2} s; p50/p99 are per call; \
             A/B rows of sections a and d ran interleaved in {} rounds (per-round ratio range shown)",
            p.limits(1).budget.as_secs_f64(),
            p.rounds()
        ),
        format!("load average before: {load_before}, after: {}", loadavg()),
    ];
    rep.print(&header);
    let ok = rep.failures.is_empty();
    if !ok {
        let kept = tmp.keep();
        eprintln!("progressdb-bench: logs kept in {}", kept.display());
    }
    Ok(ok)
}

/// The 1-minute load average (other processes competing for the CPUs skew every figure).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn softhsm_version_line() -> String {
    format!("SoftHSM {}", softhsm_version())
}
