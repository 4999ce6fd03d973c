//! The server's paths: durable posts, ProgressDB's benchmark pattern and page reads, through
//! the external KMS against the same server with encryption off.

use super::*;

/// A server prepared for the workloads: threads to post into and one full page to read.
pub(crate) struct Prepared {
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

pub(super) fn post(run: &ServerRun, api: &Api, thread: &str, n: usize) -> Result<()> {
    run.call(
        api,
        "POST",
        &format!("/v1/threads/{thread}/messages"),
        Some(&json!({ "body": message_body(n) })),
        201,
    )
    .map(drop)
}

pub(super) fn new_thread(run: &ServerRun, api: &Api, title: &str) -> Result<String> {
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

pub(crate) fn prepare(run: ServerRun) -> Result<Prepared> {
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

pub(super) fn post_row(s: &Prepared, conc: usize, lim: Limits) -> Result<Row> {
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
pub(crate) enum ServerWork {
    Post,
    Page,
    /// ProgressDB's `thread_with_messages` pattern through its paths.
    ProgressDb,
}

/// The encrypted server (external KMS over UDS) vs the same server with encryption off,
/// interleaved.
pub(crate) fn server_pair(
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
