//! The scenarios of `docs/benchmarks.md`: each measures one path of the system and, in the
//! same run and interleaved with it, the limit that path approaches (a bare server, a raw
//! PKCS#11 loop, the same server with encryption off, ...).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use kms_api::client::KmsClient;
use kms_api::wire::{Bytes64, DecryptRequest, EncryptRequest, ItemResult, SecretBytes};
use kms_api::{KekId, KekVersion, KeyId, ThreadId, WrappedDek};
use progressdb_e2e::{Api, Role};
use progressdb_kms::keystore::lmdb::LmdbStore;
use progressdb_kms::keystore::{KeyRecord, KeyState, KeyStore as _};
use progressdb_kms::metrics::StoreMetrics;
use rand::RngCore as _;
use serde_json::json;

use crate::hsm_raw::{self, RawHsm, RawWrapped};
use crate::measure::{run_async, run_threads, status_kib, Limits, Probe, Row};
use crate::procs::{pid, CannedRun, KmsRun, ServerRun};

mod kms;
mod lifecycle;
mod memory;
mod replicas;
mod residency;
mod server;
pub(crate) use kms::*;
pub(crate) use lifecycle::*;
pub(crate) use memory::*;
pub(crate) use replicas::*;
pub(crate) use residency::*;
pub(crate) use server::*;

/// Plaintext size of every message-sized payload.
pub(crate) const MESSAGE_BYTES: usize = 1024;
/// Items of the `/encrypt_batch` scenario.
pub(crate) const BATCH_ITEMS: usize = 100;
/// Messages per page read.
pub(crate) const PAGE: usize = 100;
/// The KMS's default `hsm.sessions`: its HSM worker threads, so the threads of the raw loops.
pub(crate) const KMS_HSM_SESSIONS: usize = 4;
/// The KMS's default `lifecycle.rewrap_concurrency`.
pub(crate) const KMS_REWRAP_CONCURRENCY: usize = 2;
/// The server's DEK-rotation job batch (`server/src/jobs.rs`).
pub(crate) const SERVER_ROTATION_BATCH: usize = 64;

/// Full run or smoke run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Profile {
    pub quick: bool,
}

/// Sizes of the scenarios that build up data first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scale {
    pub rewrap_deks: usize,
    pub rotation_messages: usize,
    pub kms_keys: usize,
    pub server_messages: usize,
}

impl Profile {
    /// Interleaved rounds of each system/limit pair, so drift and background load hit both.
    pub(crate) fn rounds(self) -> usize {
        if self.quick {
            1
        } else {
            3
        }
    }

    /// Limits for a workload whose full run may do up to `full_ops` calls.
    pub(crate) fn limits(self, full_ops: usize) -> Limits {
        if self.quick {
            Limits {
                max_ops: (full_ops / 100).clamp(16, 200),
                budget: Duration::from_millis(250),
                warmup: 4,
            }
        } else {
            Limits {
                max_ops: full_ops,
                budget: Duration::from_secs(4),
                warmup: 64,
            }
        }
    }

    pub(crate) fn scale(self) -> Scale {
        if self.quick {
            Scale {
                rewrap_deks: 200,
                rotation_messages: 200,
                kms_keys: 2_000,
                server_messages: 500,
            }
        } else {
            Scale {
                rewrap_deks: 100_000,
                rotation_messages: 100_000,
                kms_keys: 1_000_000,
                server_messages: 1_000_000,
            }
        }
    }
}

/// One memory figure: a process holding `records` records, after a workload over them.
#[derive(Clone, Debug)]
pub(crate) struct Memory {
    pub process: String,
    pub records: usize,
    pub peak_rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
}

/// A scenario's result: the system's row and the limits measured in the same run.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub id: String,
    pub title: String,
    /// What `rate` counts per second.
    pub unit: &'static str,
    pub system: Row,
    /// (what, row): the ratio is taken against the lowest rate.
    pub limits: Vec<(String, Row)>,
    /// The ratio the issue asks for; `None`: report only.
    pub target: Option<f64>,
    /// Smallest and largest per-round ratio when the pair ran interleaved.
    pub round_range: Option<(f64, f64)>,
    pub memory: Vec<Memory>,
    pub notes: Vec<String>,
}

impl Outcome {
    fn new(id: &str, title: String, unit: &'static str, system: Row) -> Self {
        Self {
            id: id.to_owned(),
            title,
            unit,
            system,
            limits: Vec::new(),
            target: None,
            round_range: None,
            memory: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Whether this is a rate (not only memory figures).
    pub(crate) fn has_rate(&self) -> bool {
        !self.unit.is_empty()
    }

    /// The limit the ratio is taken against: the slowest one.
    pub(crate) fn limit(&self) -> Option<&(String, Row)> {
        self.limits
            .iter()
            .min_by(|a, b| a.1.rate().total_cmp(&b.1.rate()))
    }

    pub(crate) fn ratio(&self) -> Option<f64> {
        self.limit()
            .map(|(_, l)| self.system.rate() / l.rate().max(1e-9))
    }

    pub(crate) fn met(&self) -> Option<bool> {
        Some(self.ratio()? >= self.target?)
    }
}

/// Everything the scenarios share.
pub(crate) struct Env {
    pub p: Profile,
    pub raw: Arc<RawHsm>,
    pub raw_sessions:
        Arc<Vec<std::sync::Mutex<(cryptoki::session::Session, cryptoki::object::ObjectHandle)>>>,
}

async fn watched<F>(procs: &[(String, u32)], f: F) -> Result<Row>
where
    F: std::future::Future<Output = Result<Row>>,
{
    let probe = Probe::start(procs);
    let mut row = f.await?;
    row.usage = probe.finish();
    Ok(row)
}

fn watched_sync(procs: &[(String, u32)], f: impl FnOnce() -> Result<Row>) -> Result<Row> {
    let probe = Probe::start(procs);
    let mut row = f()?;
    row.usage = probe.finish();
    Ok(row)
}

fn smallest_largest(num: &[Row], den: &[Row]) -> Option<(f64, f64)> {
    if num.len() < 2 {
        return None;
    }
    let rs: Vec<f64> = num
        .iter()
        .zip(den)
        .map(|(a, b)| a.rate() / b.rate().max(1e-9))
        .collect();
    Some((
        rs.iter().copied().fold(f64::INFINITY, f64::min),
        rs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    ))
}

pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn random_key_id() -> KeyId {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    KeyId::from_random(b)
}

fn hex_id() -> String {
    random_bytes(4).iter().map(|b| format!("{b:02x}")).collect()
}

fn proc_of(name: &str, proc: &progressdb_e2e::Proc) -> (String, u32) {
    (name.to_owned(), pid(proc))
}

/// A DEK for a new thread.
async fn new_key(client: &KmsClient, tag: &str) -> Result<KeyId> {
    let t = ThreadId::parse(&format!("bench-{tag}-{}", hex_id()))?;
    Ok(client.create_dek_for_thread(&t).await?.key_id)
}

fn aad_for(tag: &str) -> Vec<u8> {
    format!("thread:bench-{tag}:msg:00000000000000000000-000000").into_bytes()
}

/// `n` raw wrapped DEKs on the raw token.
fn raw_set(env: &Env, n: usize) -> Result<Arc<Vec<RawWrapped>>> {
    let (s, h) = &*env
        .raw_sessions
        .first()
        .ok_or_else(|| anyhow!("no raw session"))?
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let set = (0..n)
        .map(|_| hsm_raw::generate_wrap(s, *h, env.raw.kek(), random_key_id()))
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(set))
}

/// `f(session, kek handle, op)` on `threads` threads, each with its own raw session.
fn raw_loop(
    env: &Env,
    name: &str,
    threads: usize,
    lim: Limits,
    f: impl Fn(&cryptoki::session::Session, cryptoki::object::ObjectHandle, usize) -> Result<()> + Sync,
) -> Result<Row> {
    if env.raw_sessions.len() < threads {
        bail!("{name}: {threads} raw sessions needed");
    }
    watched_sync(&[], || {
        run_threads(name, threads, lim, 1, |w, i| {
            let g = env
                .raw_sessions
                .get(w)
                .ok_or_else(|| anyhow!("no session {w}"))?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&g.0, g.1, i)
        })
    })
}
