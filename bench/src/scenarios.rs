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

/// Plaintext size of every message-sized payload.
pub const MESSAGE_BYTES: usize = 1024;
/// Items of the `/encrypt_batch` scenario.
pub const BATCH_ITEMS: usize = 100;
/// Messages per page read.
pub const PAGE: usize = 100;
/// The KMS's default `hsm.sessions`: its HSM worker threads, so the threads of the raw loops.
pub const KMS_HSM_SESSIONS: usize = 4;
/// The KMS's default `lifecycle.rewrap_concurrency`.
pub const KMS_REWRAP_CONCURRENCY: usize = 2;
/// The server's DEK-rotation job batch (`server/src/jobs.rs`).
pub const SERVER_ROTATION_BATCH: usize = 64;

/// Full run or smoke run.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    pub quick: bool,
}

/// Sizes of the scenarios that build up data first.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub rewrap_deks: usize,
    pub rotation_messages: usize,
    pub kms_keys: usize,
    pub server_messages: usize,
}

impl Profile {
    /// Interleaved rounds of each system/limit pair, so drift and background load hit both.
    pub fn rounds(self) -> usize {
        if self.quick {
            1
        } else {
            3
        }
    }

    /// Limits for a workload whose full run may do up to `full_ops` calls.
    pub fn limits(self, full_ops: usize) -> Limits {
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

    pub fn scale(self) -> Scale {
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
pub struct Memory {
    pub process: String,
    pub records: usize,
    pub peak_rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
}

/// A scenario's result: the system's row and the limits measured in the same run.
#[derive(Debug)]
pub struct Outcome {
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
    pub fn has_rate(&self) -> bool {
        !self.unit.is_empty()
    }

    /// The limit the ratio is taken against: the slowest one.
    pub fn limit(&self) -> Option<&(String, Row)> {
        self.limits
            .iter()
            .min_by(|a, b| a.1.rate().total_cmp(&b.1.rate()))
    }

    pub fn ratio(&self) -> Option<f64> {
        self.limit()
            .map(|(_, l)| self.system.rate() / l.rate().max(1e-9))
    }

    pub fn met(&self) -> Option<bool> {
        Some(self.ratio()? >= self.target?)
    }
}

/// Everything the scenarios share.
pub struct Env {
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

pub fn random_bytes(n: usize) -> Vec<u8> {
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

// ---------------------------------------------------------------------------------------------
// KMS

/// `/encrypt` of 1 KiB through `client` at `conc`, round robin over nothing: one cached key.
async fn encrypt_row(
    client: &KmsClient,
    key: &KeyId,
    conc: usize,
    lim: Limits,
    procs: &[(String, u32)],
) -> Result<Row> {
    let msg = Arc::new(random_bytes(MESSAGE_BYTES));
    let aad = Arc::new(aad_for("enc"));
    let (c, k) = (client.clone(), key.clone());
    watched(
        procs,
        run_async("KMS /encrypt", conc, lim, 1, move |_, _| {
            let (c, k, m, a) = (c.clone(), k.clone(), Arc::clone(&msg), Arc::clone(&aad));
            async move {
                c.encrypt(&k, &m, Some(&a)).await?;
                Ok(())
            }
        }),
    )
    .await
}

/// The canned body: the KMS's own answer to one `/encrypt` of 1 KiB.
pub async fn canned_encrypt_body(kms: &KmsRun) -> Result<(KeyId, Vec<u8>)> {
    let key = new_key(&kms.client, "enc").await?;
    let req = EncryptRequest {
        key_id: key.clone(),
        plaintext: SecretBytes::new(random_bytes(MESSAGE_BYTES)),
        aad: Some(Bytes64(aad_for("enc"))),
    };
    let (status, body) = kms
        .client
        .raw(http::Method::POST, "/encrypt", serde_json::to_vec(&req)?)
        .await?;
    if status != 200 {
        bail!("/encrypt answered {status}");
    }
    Ok((key, body.to_vec()))
}

/// KMS `/encrypt` 1 KiB, DEK cached, vs the canned server, same client, interleaved.
pub async fn kms_encrypt(
    env: &Env,
    kms: &KmsRun,
    key: &KeyId,
    canned: &CannedRun,
    canned_client: &KmsClient,
    conc: usize,
) -> Result<Outcome> {
    let lim = env.p.limits(400_000).per_round(env.p.rounds());
    let (mut sys, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        sys.push(encrypt_row(&kms.client, key, conc, lim, &[proc_of("kms", &kms.proc)]).await?);
        bare.push(
            encrypt_row(
                canned_client,
                key,
                conc,
                lim,
                &[proc_of("canned", &canned.proc)],
            )
            .await?,
        );
    }
    let mut o = Outcome::new(
        &format!("kms_encrypt_1k_c{conc}"),
        format!("KMS /encrypt 1 KiB over UDS, DEK cached, c={conc}"),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &bare);
    o.limits.push((
        "bare hyper server on a UDS, canned /encrypt answer, same client".into(),
        Row::merge(bare)?,
    ));
    o.target = Some(0.8);
    Ok(o)
}

/// KMS `/decrypt` with the cache disabled (every call unwraps in the HSM) vs a raw unwrap loop
/// on as many threads as the KMS has HSM workers.
pub async fn kms_decrypt_uncached(env: &Env, kms: &KmsRun) -> Result<Outcome> {
    let conc = 64;
    let mut cts = Vec::new();
    for _ in 0..64 {
        let key = new_key(&kms.client, "dec").await?;
        let ct = kms
            .client
            .encrypt(&key, &random_bytes(MESSAGE_BYTES), Some(&aad_for("dec")))
            .await?
            .ciphertext
            .0;
        cts.push((key, ct));
    }
    let cts = Arc::new(cts);
    let set = raw_set(env, 64)?;
    let lim = env.p.limits(200_000).per_round(env.p.rounds());
    let (mut sys, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        let (c, cts2) = (kms.client.clone(), Arc::clone(&cts));
        sys.push(
            watched(
                &[proc_of("kms (cache off)", &kms.proc)],
                run_async("KMS /decrypt uncached", conc, lim, 1, move |_, i| {
                    let (c, cts) = (c.clone(), Arc::clone(&cts2));
                    async move {
                        let (k, ct) = cts.get(i % cts.len()).ok_or_else(|| anyhow!("empty"))?;
                        c.decrypt(k, ct, Some(&aad_for("dec"))).await?;
                        Ok(())
                    }
                }),
            )
            .await?,
        );
        let s = Arc::clone(&set);
        raw.push(tokio::task::block_in_place(|| {
            raw_loop(env, "raw unwrap", KMS_HSM_SESSIONS, lim, |sess, h, i| {
                let w = s.get(i % s.len()).ok_or_else(|| anyhow!("empty"))?;
                hsm_raw::unwrap(sess, h, env.raw.kek(), w).map(drop)
            })
        })?);
    }
    let mut o = Outcome::new(
        "kms_decrypt_uncached_c64",
        format!("KMS /decrypt 1 KiB, cache disabled, c={conc}"),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &raw);
    o.limits.push((
        format!("raw PKCS#11 unwrap loop, {KMS_HSM_SESSIONS} threads (the KMS's HSM workers)"),
        Row::merge(raw)?,
    ));
    o.target = Some(0.7);
    Ok(o)
}

fn planted_record(kek: &KekId, i: usize) -> Result<KeyRecord> {
    // The KMS's AesGcmV1 layout: format 1, KEK version 1 (big-endian u32), IV, DEK+tag.
    let mut blob = vec![1u8, 0, 0, 0, 1];
    blob.extend(random_bytes(12 + 32 + 16));
    Ok(KeyRecord {
        key_id: random_key_id(),
        kek_id: kek.clone(),
        kek_version: KekVersion::new(1)?,
        thread_id: ThreadId::parse(&format!("bench-plant-{i}"))?,
        created_at: 1_700_000_000,
        state: KeyState::Active {
            wrapped: WrappedDek::new(blob),
        },
    })
}

/// `create_dek_for_thread` at c=64 vs a raw generate+wrap loop and the key store's own
/// group-commit rate (an in-process LMDB store of the KMS's type, 64 writers).
pub async fn kms_create_dek(env: &Env, kms: &KmsRun, scratch: &Path) -> Result<Outcome> {
    let conc = 64;
    let run = hex_id();
    let seq = Arc::new(AtomicUsize::new(0));
    let lim = env.p.limits(100_000).per_round(env.p.rounds());
    let store = Arc::new(
        LmdbStore::open(scratch, 4096, StoreMetrics::default())
            .map_err(|e| anyhow!("opening a scratch key store: {e}"))?,
    );
    let kek = KekId::parse("bench-kek")?;
    let (mut sys, mut raw, mut st) = (Vec::new(), Vec::new(), Vec::new());
    let before = crate::kms_metrics(&kms.client).await?;
    for _ in 0..env.p.rounds() {
        let (c, r, s) = (kms.client.clone(), run.clone(), Arc::clone(&seq));
        sys.push(
            watched(
                &[proc_of("kms", &kms.proc)],
                run_async("KMS /create_dek_for_thread", conc, lim, 1, move |_, _| {
                    let (c, r, s) = (c.clone(), r.clone(), Arc::clone(&s));
                    async move {
                        let n = s.fetch_add(1, Ordering::Relaxed);
                        let t = ThreadId::parse(&format!("bench-c-{r}-{n}"))?;
                        c.create_dek_for_thread(&t).await?;
                        Ok(())
                    }
                }),
            )
            .await?,
        );
        raw.push(tokio::task::block_in_place(|| {
            raw_loop(
                env,
                "raw generate+wrap",
                KMS_HSM_SESSIONS,
                lim,
                |sess, h, _| {
                    hsm_raw::generate_wrap(sess, h, env.raw.kek(), random_key_id()).map(drop)
                },
            )
        })?);
        let (s2, k2, n2) = (Arc::clone(&store), kek.clone(), Arc::clone(&seq));
        st.push(
            watched(
                &[],
                run_async("key store put_new", conc, lim, 1, move |_, _| {
                    let (s, k, n) = (Arc::clone(&s2), k2.clone(), Arc::clone(&n2));
                    async move {
                        let rec = planted_record(&k, n.fetch_add(1, Ordering::Relaxed))?;
                        s.put_new(rec).await.map_err(|e| anyhow!("put_new: {e}"))
                    }
                }),
            )
            .await?,
        );
    }
    let after = crate::kms_metrics(&kms.client).await?;
    let mut o = Outcome::new(
        "kms_create_dek_c64",
        format!("KMS create_dek_for_thread, durable, c={conc}"),
        "req/s",
        Row::merge(sys)?,
    );
    o.limits.push((
        format!("raw PKCS#11 generate+wrap loop, {KMS_HSM_SESSIONS} threads"),
        Row::merge(raw)?,
    ));
    o.limits.push((
        "the key store's group commit alone (in-process, 64 writers, fsync)".into(),
        Row::merge(st)?,
    ));
    let d = |name: &str| {
        Some(crate::procs::metric(&after, name)? - crate::procs::metric(&before, name)?)
    };
    // A create is one store write of an audit group (its key records and audit entries,
    // one transaction); several groups can share a commit. Keys per commit is what counts.
    if let Some(c) = d("progressdb_kms_keystore_commits_total") {
        let created = o.system.calls + lim.warmup * env.p.rounds();
        if c > 0.0 {
            o.notes.push(format!(
                "{created} creates took {c:.0} durable commits: {:.1} keys per fsync",
                created as f64 / c
            ));
        }
    }
    o.target = Some(0.6);
    Ok(o)
}

/// `/encrypt_batch` of 100 × 1 KiB vs AES-256-GCM of the same items in-process on one core.
/// [`BATCH_ITEMS`] encrypt requests of 1 KiB under one new key, and their AAD.
async fn batch_items(kms: &KmsRun) -> Result<(Arc<Vec<EncryptRequest>>, Vec<u8>)> {
    let key_id = new_key(&kms.client, "batch").await?;
    let aad = aad_for("batch");
    let items = (0..BATCH_ITEMS)
        .map(|_| EncryptRequest {
            key_id: key_id.clone(),
            plaintext: SecretBytes::new(random_bytes(MESSAGE_BYTES)),
            aad: Some(Bytes64(aad.clone())),
        })
        .collect();
    Ok((Arc::new(items), aad))
}

pub async fn kms_encrypt_batch(env: &Env, kms: &KmsRun) -> Result<Outcome> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    use ring::rand::{SecureRandom as _, SystemRandom};
    let (items, aad) = batch_items(kms).await?;
    let lim = env.p.limits(20_000).per_round(env.p.rounds());
    let (mut sys, mut ring_rows) = (Vec::new(), Vec::new());
    let dek = zeroize::Zeroizing::new(random_bytes(32));
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &dek).map_err(|_| anyhow!("ring: bad key length"))?,
    );
    let rng = SystemRandom::new();
    let plain = random_bytes(MESSAGE_BYTES);
    for _ in 0..env.p.rounds() {
        let (c, it) = (kms.client.clone(), Arc::clone(&items));
        sys.push(
            watched(
                &[proc_of("kms", &kms.proc)],
                run_async("KMS /encrypt_batch", 1, lim, BATCH_ITEMS, move |_, _| {
                    let (c, it) = (c.clone(), Arc::clone(&it));
                    async move {
                        let res = c.encrypt_batch(it.as_ref()).await?;
                        if res.iter().any(|r| matches!(r, ItemResult::Error(_))) {
                            bail!("a batch item failed");
                        }
                        Ok(())
                    }
                }),
            )
            .await?,
        );
        ring_rows.push(tokio::task::block_in_place(|| {
            watched_sync(&[], || {
                run_threads("ring", 1, lim, BATCH_ITEMS, |_, _| {
                    for _ in 0..BATCH_ITEMS {
                        let mut nonce = [0u8; 12];
                        rng.fill(&mut nonce).map_err(|_| anyhow!("rng"))?;
                        let mut out = Vec::with_capacity(12 + MESSAGE_BYTES + 16);
                        out.extend_from_slice(&nonce);
                        out.extend_from_slice(&plain);
                        let tag = key
                            .seal_in_place_separate_tag(
                                Nonce::assume_unique_for_key(nonce),
                                Aad::from(&aad[..]),
                                out.get_mut(12..).ok_or_else(|| anyhow!("buffer"))?,
                            )
                            .map_err(|_| anyhow!("seal"))?;
                        out.extend_from_slice(tag.as_ref());
                        std::hint::black_box(out);
                    }
                    Ok(())
                })
            })
        })?);
    }
    let mut o = Outcome::new(
        "kms_encrypt_batch_100x1k",
        format!("KMS /encrypt_batch {BATCH_ITEMS} × 1 KiB over UDS, c=1"),
        "items/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &ring_rows);
    o.limits.push((
        "in-process AES-256-GCM (ring) of the same items, one core".into(),
        Row::merge(ring_rows)?,
    ));
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Server

/// A server prepared for the workloads: threads to post into and one full page to read.
pub struct Prepared {
    pub run: ServerRun,
    pub api: Api,
    pub threads: Vec<String>,
    pub page_path: String,
    pub posted: AtomicUsize,
}

fn message_body(n: usize) -> serde_json::Value {
    // About 1 KiB of JSON text.
    json!({ "text": "x".repeat(MESSAGE_BYTES - 16), "n": n })
}

fn post(run: &ServerRun, api: &Api, thread: &str, n: usize) -> Result<()> {
    run.call(
        api,
        "POST",
        &format!("/v1/threads/{thread}/messages"),
        Some(&json!({ "body": message_body(n) })),
        201,
    )
    .map(drop)
}

fn new_thread(run: &ServerRun, api: &Api, title: &str) -> Result<String> {
    let t = run.call(
        api,
        "POST",
        "/v1/threads",
        Some(&json!({ "title": title })),
        201,
    )?;
    t["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("thread without id: {t}"))
}

pub fn prepare(run: ServerRun) -> Result<Prepared> {
    let api = run.server.as_role(Role::Frontend, "bench-user");
    let threads = (0..64)
        .map(|i| new_thread(&run, &api, &format!("bench {i}")))
        .collect::<Result<Vec<_>>>()?;
    let page_thread = new_thread(&run, &api, "bench page")?;
    for i in 0..PAGE {
        post(&run, &api, &page_thread, i)?;
    }
    let page_path = format!("/v1/threads/{page_thread}/messages?limit={PAGE}&order=desc");
    let first = run.call(&api, "GET", &page_path, None, 200)?;
    let n = first["messages"].as_array().map_or(0, Vec::len);
    if n != PAGE {
        bail!("GET page returned {n} messages, expected {PAGE}");
    }
    Ok(Prepared {
        run,
        api,
        threads,
        page_path,
        posted: AtomicUsize::new(PAGE),
    })
}

fn post_row(s: &Prepared, conc: usize, lim: Limits) -> Result<Row> {
    run_threads("server POST", conc, lim, 1, |w, i| {
        let t = s
            .threads
            .get(w % s.threads.len())
            .ok_or_else(|| anyhow!("no thread"))?;
        post(&s.run, &s.api, t, i)?;
        s.posted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })
}

/// ProgressDB's own benchmark request (`prgcli benchmark --pattern thread_with_messages`,
/// `clients/cli/cmd/benchmark.go` in its repository): a message with a client `id`, 30 KB of
/// `content` and a `checksum` its server ignores, and an empty `body`.
fn progressdb_payload(n: usize) -> serde_json::Value {
    static CONTENT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| "x".repeat(PDB_PAYLOAD_BYTES));
    json!({ "id": format!("msg-{n}"), "content": CONTENT.as_str(), "checksum": "0", "body": {} })
}

/// The `content` size of ProgressDB's benchmark client (its `--payload-size` default, 30 KB).
const PDB_PAYLOAD_BYTES: usize = 30 * 1024;

/// ProgressDB's figure for that pattern: 2,832.6 requests/s (target 3,000) on 2 cores of a
/// 3.49 GHz M2 Pro, its writes acknowledged before they are applied
/// (`docs/public/v_0_2_0/general/benchmarks.md`, run 3).
const PDB_PUBLISHED_RPS: f64 = 2832.6;

fn progressdb_row(s: &Prepared, conc: usize, lim: Limits) -> Result<Row> {
    // One thread, as ProgressDB's pattern: every post lands in it.
    let t = s.threads.first().ok_or_else(|| anyhow!("no thread"))?;
    let path = format!("/frontend/v1/threads/{t}/messages");
    run_threads("server POST (ProgressDB path)", conc, lim, 1, |_, i| {
        s.run
            .call(&s.api, "POST", &path, Some(&progressdb_payload(i)), 202)
            .map(drop)?;
        s.posted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })
}

fn page_row(s: &Prepared, conc: usize, lim: Limits) -> Result<Row> {
    run_threads("server GET page", conc, lim, 1, |_, _| {
        s.run.call(&s.api, "GET", &s.page_path, None, 200).map(drop)
    })
}

/// Which server workload.
#[derive(Clone, Copy, Debug)]
pub enum ServerWork {
    Post,
    Page,
    /// ProgressDB's `thread_with_messages` pattern through its paths.
    ProgressDb,
}

/// The encrypted server (external KMS over UDS) vs the same server with encryption off,
/// interleaved.
pub fn server_pair(
    env: &Env,
    enc: &Prepared,
    plain: &Prepared,
    kms: &KmsRun,
    work: ServerWork,
    conc: usize,
) -> Result<Outcome> {
    let lim = env.p.limits(200_000).per_round(env.p.rounds());
    let enc_procs = [
        proc_of("server", &enc.run.server.proc),
        proc_of("kms", &kms.proc),
    ];
    let plain_procs = [proc_of("server (plain)", &plain.run.server.proc)];
    let f = |s: &Prepared| match work {
        ServerWork::Post => post_row(s, conc, lim),
        ServerWork::Page => page_row(s, conc, lim),
        ServerWork::ProgressDb => progressdb_row(s, conc, lim),
    };
    let (mut e, mut p) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        e.push(watched_sync(&enc_procs, || f(enc))?);
        p.push(watched_sync(&plain_procs, || f(plain))?);
    }
    let (id, title, unit, target) = match work {
        ServerWork::Post => (
            format!("server_post_1k_c{conc}"),
            format!("server POST message ~1 KiB, durable, external KMS over UDS, c={conc}"),
            "msg/s",
            0.8,
        ),
        ServerWork::Page => (
            format!("server_page_{PAGE}_c{conc}"),
            format!("server GET page of {PAGE} messages, decrypted, c={conc}"),
            "pages/s",
            0.7,
        ),
        ServerWork::ProgressDb => (
            format!("progressdb_thread_with_messages_c{conc}"),
            format!(
                "ProgressDB's thread_with_messages pattern: POST /frontend/v1/threads/{{t}}/messages \
                 with its 30 KB request, one thread, durable, external KMS over UDS, c={conc}"
            ),
            "req/s",
            0.8,
        ),
    };
    let mut o = Outcome::new(&id, title, unit, Row::merge(e.clone())?);
    o.round_range = smallest_largest(&e, &p);
    o.limits
        .push(("the same server with encryption off".into(), Row::merge(p)?));
    o.target = Some(target);
    if let ServerWork::ProgressDb = work {
        o.notes.push(format!(
            "ProgressDB's published figure for this pattern is {PDB_PUBLISHED_RPS} req/s on 2 \
             cores of a 3.49 GHz M2 Pro, each write acknowledged before it is applied; here \
             each is durable (fsynced, its message sealed through the KMS) before its answer: \
             {:.2}x ProgressDB's figure, on a different machine",
            o.system.rate() / PDB_PUBLISHED_RPS
        ));
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Replicas (docs/scaling.md)

/// `create_dek_for_thread` at c=64 through a client spread over two KMS replicas that share
/// one SoftHSM token and a PostgreSQL key store, vs the same through the one KMS on its LMDB
/// store: the price of a shared store and of the replicas' turns at the audit log.
pub async fn replicas_create_dek(
    env: &Env,
    single: &KmsRun,
    replicas: &[KmsRun],
    spread: &KmsClient,
) -> Result<Outcome> {
    let conc = 64;
    let run = hex_id();
    let seq = Arc::new(AtomicUsize::new(0));
    let lim = env.p.limits(100_000).per_round(env.p.rounds());
    // PostgreSQL's backends are processes of their own, not counted here.
    let rep_procs: Vec<(String, u32)> = replicas
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("kms replica {}", i + 1), pid(&k.proc)))
        .collect();
    let (mut sys, mut lim_rows) = (Vec::new(), Vec::new());
    let row = |c: KmsClient, what: &'static str| {
        let (r, s) = (run.clone(), Arc::clone(&seq));
        run_async(what, conc, lim, 1, move |_, _| {
            let (c, r, s) = (c.clone(), r.clone(), Arc::clone(&s));
            async move {
                let n = s.fetch_add(1, Ordering::Relaxed);
                let t = ThreadId::parse(&format!("bench-r-{r}-{n}"))?;
                c.create_dek_for_thread(&t).await?;
                Ok(())
            }
        })
    };
    for _ in 0..env.p.rounds() {
        sys.push(watched(&rep_procs, row(spread.clone(), "replicas create")).await?);
        lim_rows.push(
            watched(
                &[proc_of("kms (LMDB)", &single.proc)],
                row(single.client.clone(), "single create"),
            )
            .await?,
        );
    }
    let mut o = Outcome::new(
        "replicas_create_dek_c64",
        format!(
            "KMS create_dek_for_thread, durable, c={conc}, spread over 2 replicas on PostgreSQL"
        ),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &lim_rows);
    o.limits.push((
        "one KMS on its LMDB store, same client and load".into(),
        Row::merge(lim_rows)?,
    ));
    Ok(o)
}

/// Durable posts through a server whose `kms.endpoints` are the two replicas, vs the same
/// server build on the one LMDB KMS: what one server host does whichever KMS topology is
/// behind it.
pub fn replicas_server_post(
    env: &Env,
    on_replicas: &Prepared,
    on_single: &Prepared,
    replicas: &[KmsRun],
    single: &KmsRun,
) -> Result<Outcome> {
    let conc = 64;
    let lim = env.p.limits(200_000).per_round(env.p.rounds());
    let mut rep_procs = vec![proc_of("server", &on_replicas.run.server.proc)];
    rep_procs.extend(
        replicas
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("kms replica {}", i + 1), pid(&k.proc))),
    );
    let single_procs = [
        proc_of("server", &on_single.run.server.proc),
        proc_of("kms (LMDB)", &single.proc),
    ];
    let (mut e, mut p) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        e.push(watched_sync(&rep_procs, || {
            post_row(on_replicas, conc, lim)
        })?);
        p.push(watched_sync(&single_procs, || {
            post_row(on_single, conc, lim)
        })?);
    }
    let mut o = Outcome::new(
        &format!("replicas_server_post_1k_c{conc}"),
        format!("server POST message ~1 KiB, durable, kms.endpoints = 2 replicas on PostgreSQL, c={conc}"),
        "msg/s",
        Row::merge(e.clone())?,
    );
    o.round_range = smallest_largest(&e, &p);
    o.limits.push((
        "the same server on one KMS with its LMDB store".into(),
        Row::merge(p)?,
    ));
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Lifecycle

/// Creates `n` DEKs at c=64.
async fn create_many(client: &KmsClient, n: usize, tag: &str) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let run = hex_id();
    for _ in 0..64 {
        let (c, next, run, tag) = (
            client.clone(),
            Arc::clone(&next),
            run.clone(),
            tag.to_owned(),
        );
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let t = ThreadId::parse(&format!("bench-{tag}-{run}-{i}"))?;
                c.create_dek_for_thread(&t).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// KEK rotation's rewrap phase over at least `n` DEKs vs a raw unwrap+wrap loop on as many
/// threads as the job runs rewraps at once.
pub async fn kek_rewrap(env: &Env, kms: &KmsRun, n: usize) -> Result<Outcome> {
    let existing = kms.admin.admin_status().await?.active_deks;
    if (existing as usize) < n {
        eprintln!("  creating {} DEKs for the rewrap", n - existing as usize);
        create_many(&kms.client, n - existing as usize, "rewrap").await?;
    }
    let probe = Probe::start(&[proc_of("kms", &kms.proc)]);
    let start = Instant::now();
    let job = kms.admin.rotate_kek().await?.job;
    let mut rewrap_done = None;
    let last = loop {
        let j = kms.admin.job(&job.id).await?;
        let state = serde_json::to_value(j.state)?;
        let state = state.as_str().unwrap_or("");
        if rewrap_done.is_none() && matches!(state, "verifying" | "succeeded") {
            rewrap_done = Some((start.elapsed(), j.progress.rewrapped));
        }
        match state {
            "succeeded" => break j,
            "failed" => bail!("the rotation failed: {j:?}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let total = start.elapsed();
    let usage = probe.finish();
    let (rewrap_time, rewrapped) = rewrap_done.ok_or_else(|| anyhow!("no rewrap phase seen"))?;
    let mut sys = Row::single(rewrapped as usize, rewrap_time);
    sys.usage = usage;
    let set = raw_set(env, 64)?;
    let lim = env.p.limits(400_000);
    let raw = tokio::task::block_in_place(|| {
        raw_loop(
            env,
            "raw unwrap+wrap",
            KMS_REWRAP_CONCURRENCY,
            lim,
            |sess, h, i| {
                let w = set.get(i % set.len()).ok_or_else(|| anyhow!("empty"))?;
                let dek = hsm_raw::unwrap(sess, h, env.raw.kek(), w)?;
                hsm_raw::wrap(sess, h, env.raw.kek(), w.key_id.clone(), &dek).map(drop)
            },
        )
    })?;
    let mut o = Outcome::new(
        &format!("kek_rewrap_{rewrapped}"),
        format!("KEK rotation: rewrap phase over {rewrapped} DEKs (job, rewrap concurrency {KMS_REWRAP_CONCURRENCY})"),
        "DEKs/s",
        sys,
    );
    o.limits.push((
        format!("raw PKCS#11 unwrap+wrap loop, {KMS_REWRAP_CONCURRENCY} threads"),
        raw,
    ));
    o.notes.push(format!(
        "the whole job (new KEK version, rewrap, then an unwrap of every DEK to verify) took {:.1} s: {:.0} DEKs/s; verified {}",
        total.as_secs_f64(),
        last.progress.verified as f64 / total.as_secs_f64().max(1e-9),
        last.progress.verified
    ));
    o.target = Some(0.6);
    Ok(o)
}

/// A thread's DEK rotation over `n` messages vs the KMS's decrypt+encrypt batch rate at the
/// job's batch size.
pub async fn thread_rotation(env: &Env, enc: &Prepared, kms: &KmsRun, n: usize) -> Result<Outcome> {
    let thread = tokio::task::block_in_place(|| -> Result<String> {
        let t = new_thread(&enc.run, &enc.api, "bench rotation")?;
        eprintln!("  posting {n} messages to one thread");
        run_threads(
            "fill",
            64,
            Limits {
                max_ops: n,
                budget: Duration::from_secs(3600),
                warmup: 0,
            },
            1,
            |_, i| post(&enc.run, &enc.api, &t, i),
        )?;
        enc.posted.fetch_add(n, Ordering::Relaxed);
        Ok(t)
    })?;
    let admin = enc.run.server.as_role(Role::Admin, "bench-ops");
    let procs = [
        proc_of("server", &enc.run.server.proc),
        proc_of("kms", &kms.proc),
    ];
    let (row, migrated) = tokio::task::block_in_place(|| -> Result<(Row, u64)> {
        let probe = Probe::start(&procs);
        let start = Instant::now();
        let r = enc.run.call(
            &admin,
            "POST",
            &format!("/admin/threads/{thread}/rotate-dek"),
            None,
            202,
        )?;
        let job = r["job_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no job id: {r}"))?
            .to_owned();
        let migrated = loop {
            let j = enc
                .run
                .call(&admin, "GET", &format!("/admin/jobs/{job}"), None, 200)?;
            match j["state"].as_str() {
                Some("succeeded") => break j["progress"]["migrated"].as_u64().unwrap_or(0),
                Some("failed") => bail!("the rotation failed: {j}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut row = Row::single(n, start.elapsed());
        row.usage = probe.finish();
        Ok((row, migrated))
    })?;
    if migrated as usize != n {
        bail!("the rotation migrated {migrated} messages, expected {n}");
    }
    // The limit: one decrypt_batch and one encrypt_batch of the job's batch size, in turn.
    let key = new_key(&kms.client, "rot").await?;
    let aad = aad_for("rot");
    let mut dec = Vec::new();
    for _ in 0..SERVER_ROTATION_BATCH {
        let ct = kms
            .client
            .encrypt(&key, &random_bytes(MESSAGE_BYTES), Some(&aad))
            .await?
            .ciphertext;
        dec.push(DecryptRequest {
            key_id: key.clone(),
            ciphertext: ct,
            aad: Some(Bytes64(aad.clone())),
        });
    }
    let encs: Vec<EncryptRequest> = (0..SERVER_ROTATION_BATCH)
        .map(|_| EncryptRequest {
            key_id: key.clone(),
            plaintext: SecretBytes::new(random_bytes(MESSAGE_BYTES)),
            aad: Some(Bytes64(aad.clone())),
        })
        .collect();
    let (dec, encs) = (Arc::new(dec), Arc::new(encs));
    let c = kms.client.clone();
    let lim = env.p.limits(50_000);
    let limit = watched(
        &[proc_of("kms", &kms.proc)],
        run_async(
            "KMS decrypt_batch + encrypt_batch",
            1,
            lim,
            SERVER_ROTATION_BATCH,
            move |_, _| {
                let (c, d, e) = (c.clone(), Arc::clone(&dec), Arc::clone(&encs));
                async move {
                    let a = c.decrypt_batch(&d).await?;
                    let b = c.encrypt_batch(&e).await?;
                    let failed_dec = a.iter().any(|r| matches!(r, ItemResult::Error(_)));
                    let failed_enc = b.iter().any(|r| matches!(r, ItemResult::Error(_)));
                    if failed_dec || failed_enc {
                        bail!("a batch item failed");
                    }
                    Ok(())
                }
            },
        ),
    )
    .await?;
    let mut o = Outcome::new(
        &format!("thread_dek_rotation_{n}"),
        format!("thread DEK rotation over {n} messages of ~1 KiB (job, verify included)"),
        "msg/s",
        row,
    );
    o.limits.push((
        format!("KMS decrypt_batch + encrypt_batch of {SERVER_ROTATION_BATCH} × 1 KiB, one after the other"),
        limit,
    ));
    o.target = Some(0.5);
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Plants `n` key records straight into a prepared KMS's store (records that are never
/// unwrapped: the workload reads them through `/get_wrapped`).
pub async fn plant(store_dir: &Path, kek: &KekId, n: usize) -> Result<Vec<KeyId>> {
    let store = Arc::new(
        LmdbStore::open(store_dir, 4096, StoreMetrics::default())
            .map_err(|e| anyhow!("opening the key store to plant records: {e}"))?,
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let (s, next, kek) = (Arc::clone(&store), Arc::clone(&next), kek.clone());
        set.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ids);
                }
                let rec = planted_record(&kek, i)?;
                // One in a hundred is kept for the read workload.
                if i % 100 == 0 {
                    ids.push(rec.key_id.clone());
                }
                s.put_new(rec).await.map_err(|e| anyhow!("put_new: {e}"))?;
            }
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = set.join_next().await {
        ids.extend(r.context("planting task")??);
    }
    Ok(ids)
}

/// The memory workload on a KMS holding `records` records (`sample` of them known): reads of
/// wrapped DEKs across the store, then creates and encrypts with more keys than the cache
/// holds. Returns the KMS's figures.
pub async fn kms_memory_workload(
    env: &Env,
    kms: &KmsRun,
    sample: Arc<Vec<KeyId>>,
    records: usize,
) -> Result<Memory> {
    let probe = Probe::start(&[proc_of("kms", &kms.proc)]);
    let lim = Limits {
        max_ops: if env.p.quick { 500 } else { 20_000 },
        budget: Duration::from_secs(60),
        warmup: 0,
    };
    let c = kms.client.clone();
    let s = Arc::clone(&sample);
    run_async("get_wrapped", 16, lim, 1, move |_, i| {
        let (c, s) = (c.clone(), Arc::clone(&s));
        async move {
            let k = s
                .get(i % s.len().max(1))
                .ok_or_else(|| anyhow!("no sample"))?;
            c.get_wrapped(k).await?;
            Ok(())
        }
    })
    .await?;
    // More live keys than the cache holds (1000 in the bench's KMS config).
    let keys = if env.p.quick { 300 } else { 3_000 };
    let c = kms.client.clone();
    let msg = Arc::new(random_bytes(MESSAGE_BYTES));
    run_async(
        "create+encrypt",
        16,
        Limits {
            max_ops: keys,
            budget: Duration::from_secs(120),
            warmup: 0,
        },
        1,
        move |_, _| {
            let (c, m) = (c.clone(), Arc::clone(&msg));
            async move {
                let k = new_key(&c, "mem").await?;
                c.encrypt(&k, &m, None).await?;
                Ok(())
            }
        },
    )
    .await?;
    let u = probe.finish();
    let p = pid(&kms.proc);
    Ok(Memory {
        process: "progressdb-kms".into(),
        records,
        peak_rss_kib: u
            .iter()
            .find(|u| u.name == "kms")
            .map_or(0, |u| u.peak_rss_kib),
        rss_anon_kib: status_kib(p, "RssAnon:"),
        rss_file_kib: status_kib(p, "RssFile:"),
    })
}

/// The server's figures after a read workload over `messages` stored messages.
pub fn server_memory(enc: &Prepared, messages: usize) -> Result<Memory> {
    let probe = Probe::start(&[proc_of("server", &enc.run.server.proc)]);
    run_threads(
        "pages",
        16,
        Limits {
            max_ops: 2_000,
            budget: Duration::from_secs(20),
            warmup: 0,
        },
        1,
        |w, _| {
            let t = enc
                .threads
                .get(w % enc.threads.len())
                .ok_or_else(|| anyhow!("no thread"))?;
            enc.run
                .call(
                    &enc.api,
                    "GET",
                    &format!("/v1/threads/{t}/messages?limit={PAGE}"),
                    None,
                    200,
                )
                .map(drop)
        },
    )?;
    let u = probe.finish();
    let p = pid(&enc.run.server.proc);
    Ok(Memory {
        process: "progressdb".into(),
        records: messages,
        peak_rss_kib: u
            .iter()
            .find(|u| u.name == "server")
            .map_or(0, |u| u.peak_rss_kib),
        rss_anon_kib: status_kib(p, "RssAnon:"),
        rss_file_kib: status_kib(p, "RssFile:"),
    })
}

/// Posts into the prepared threads until the server holds `total` messages.
pub fn fill_server(enc: &Prepared, total: usize) -> Result<()> {
    let have = enc.posted.load(Ordering::Relaxed);
    if have >= total {
        return Ok(());
    }
    eprintln!("  posting {} messages", total - have);
    run_threads(
        "fill",
        64,
        Limits {
            max_ops: total - have,
            budget: Duration::from_secs(3600),
            warmup: 0,
        },
        1,
        |w, i| {
            let t = enc
                .threads
                .get(w % enc.threads.len())
                .ok_or_else(|| anyhow!("no thread"))?;
            post(&enc.run, &enc.api, t, i)
        },
    )?;
    enc.posted.store(total, Ordering::Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// DEK residency

/// `/encrypt` 1 KiB at `conc` on a KMS with `hsm.dek_residency = "hsm"` (every message
/// encrypted by the HSM) vs the same on a memory-mode KMS, same client, interleaved.
pub async fn kms_hsm_encrypt(
    env: &Env,
    memory: &KmsRun,
    resident: &KmsRun,
    conc: usize,
) -> Result<Outcome> {
    let (mkey, rkey) = (
        new_key(&memory.client, "enc").await?,
        new_key(&resident.client, "enc").await?,
    );
    let lim = env.p.limits(200_000).per_round(env.p.rounds());
    let (mut sys, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        sys.push(
            encrypt_row(
                &resident.client,
                &rkey,
                conc,
                lim,
                &[proc_of("kms", &resident.proc)],
            )
            .await?,
        );
        mem.push(
            encrypt_row(
                &memory.client,
                &mkey,
                conc,
                lim,
                &[proc_of("kms", &memory.proc)],
            )
            .await?,
        );
    }
    let mut o = Outcome::new(
        &format!("kms_hsm_encrypt_1k_c{conc}"),
        format!(
            "KMS /encrypt 1 KiB over UDS, hsm.dek_residency = hsm (AES-GCM in the HSM), c={conc}"
        ),
        "req/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &mem);
    o.limits.push((
        "the same KMS build in memory residency (DEK cached in the KMS), same client".into(),
        Row::merge(mem)?,
    ));
    Ok(o)
}

/// `/encrypt_batch` of [`BATCH_ITEMS`] × 1 KiB in hsm residency (spread over the HSM
/// sessions) vs memory residency, c=4.
pub async fn kms_hsm_encrypt_batch(
    env: &Env,
    memory: &KmsRun,
    resident: &KmsRun,
) -> Result<Outcome> {
    async fn row(env: &Env, kms: &KmsRun) -> Result<Row> {
        let (items, _) = batch_items(kms).await?;
        let lim = env.p.limits(10_000).per_round(env.p.rounds());
        let c = kms.client.clone();
        watched(
            &[proc_of("kms", &kms.proc)],
            run_async("KMS /encrypt_batch", 4, lim, BATCH_ITEMS, move |_, _| {
                let (c, it) = (c.clone(), Arc::clone(&items));
                async move {
                    let res = c.encrypt_batch(it.as_ref()).await?;
                    if res.iter().any(|r| matches!(r, ItemResult::Error(_))) {
                        bail!("a batch item failed");
                    }
                    Ok(())
                }
            }),
        )
        .await
    }
    let (mut sys, mut mem) = (Vec::new(), Vec::new());
    for _ in 0..env.p.rounds() {
        sys.push(row(env, resident).await?);
        mem.push(row(env, memory).await?);
    }
    let mut o = Outcome::new(
        "kms_hsm_encrypt_batch_100x1k",
        format!("KMS /encrypt_batch {BATCH_ITEMS} × 1 KiB over UDS, hsm.dek_residency = hsm, c=4"),
        "items/s",
        Row::merge(sys.clone())?,
    );
    o.round_range = smallest_largest(&sys, &mem);
    o.limits.push((
        "the same batches in memory residency".into(),
        Row::merge(mem)?,
    ));
    Ok(o)
}
