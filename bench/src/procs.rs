//! The processes a benchmark measures: `progressdb-kms`, `progressdb` and the bare hyper
//! server that answers a canned body (the limit of the KMS's HTTP path), and the glue that
//! starts them and waits until they serve.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use kms_api::client::{Endpoint, KmsClient, KmsClientConfig};
use progressdb_e2e::{
    Api, KmsBuilder, KmsStore, Proc, Provider, Residency, Server, ServerBuilder, Token,
};
use serde_json::Value;

/// The pid of a running child.
pub(crate) fn pid(proc: &Proc) -> u32 {
    proc.child.as_ref().map_or(0, std::process::Child::id)
}

pub(crate) fn harness<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
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
pub(crate) fn resolve_bin_dir() -> PathBuf {
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

pub(crate) fn need_bins(dir: &Path, names: &[&str]) -> Result<()> {
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

pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub(crate) fn exited(proc: &mut Proc) -> Option<String> {
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

/// A running `progressdb-kms` on its own SoftHSM token, with a client for its socket and one
/// for its admin socket.
pub(crate) struct KmsRun {
    pub proc: Proc,
    pub endpoint: String,
    pub client: KmsClient,
    pub admin: KmsClient,
    /// Kept for the token's lifetime.
    pub _hsm: Token,
}

/// A KMS set up under its root and not started: token, KEK, config and an empty store at
/// `<root>/kms/store`.
pub(crate) struct KmsPrepared {
    pub hsm: Token,
    pub config: PathBuf,
    pub endpoint: String,
    pub root: PathBuf,
}

impl KmsPrepared {
    pub(crate) fn store_dir(&self) -> PathBuf {
        self.root.join("kms/store")
    }
}

/// Makes a token, a KEK and a config under `root` (the KMS in `residency`).
fn prepare(bins: &Path, root: &Path, residency: Residency) -> Result<KmsPrepared> {
    need_bins(bins, &["progressdb-kms"])?;
    std::fs::create_dir_all(root)?;
    let hsm = harness("creating the SoftHSM token", || Token::new(root))?;
    let kms = harness("KMS config and init-kek", || {
        KmsBuilder::new(root)
            .token(&hsm)
            .residency(residency)
            .binary(bins.join("progressdb-kms"))
            .provision()
    })?;
    Ok(KmsPrepared {
        hsm,
        config: kms.config.clone(),
        endpoint: kms.endpoint.clone(),
        root: root.to_owned(),
    })
}

/// Makes a token, a KEK and a config under `root`.
pub(crate) fn prepare_kms(bins: &Path, root: &Path) -> Result<KmsPrepared> {
    prepare(bins, root, Residency::Memory)
}

/// [`prepare_kms`] for a KMS in `hsm.dek_residency = "hsm"`: the config says so before
/// `init-kek`, which then makes a wrap-class KEK.
pub(crate) fn prepare_resident_kms(bins: &Path, root: &Path) -> Result<KmsPrepared> {
    prepare(bins, root, Residency::Hsm)
}

/// Two KMS replicas under `root` on one new SoftHSM token and one database of `pg`, started
/// and ready, and a client spread over both.
pub(crate) async fn start_replicas(
    bins: &Path,
    root: &Path,
    pg: &testkit::pg::PgCluster,
) -> Result<(Vec<KmsRun>, KmsClient)> {
    need_bins(bins, &["progressdb-kms"])?;
    std::fs::create_dir_all(root)?;
    let hsm = harness("creating the SoftHSM token", || Token::new(root))?;
    let store = KmsStore::Postgres(pg.new_database());
    let mut runs = Vec::new();
    for i in 0..2 {
        let r = root.join(format!("replica-{i}"));
        std::fs::create_dir_all(&r)?;
        let kms = harness("KMS config and init-kek", || {
            KmsBuilder::new(&r)
                .token(&hsm)
                .store(store.clone())
                .binary(bins.join("progressdb-kms"))
                .provision()
        })?;
        let p = KmsPrepared {
            hsm: hsm.clone(),
            config: kms.config.clone(),
            endpoint: kms.endpoint.clone(),
            root: r,
        };
        runs.push(spawn_kms(bins, p, &[]).await?);
    }
    let endpoints = runs
        .iter()
        .map(|k| Endpoint::from_str(&k.endpoint))
        .collect::<Result<Vec<_>, _>>()?;
    let mut cfg = KmsClientConfig::replicas(endpoints, None);
    cfg.max_idle = 64;
    Ok((runs, KmsClient::new(cfg)?))
}

/// [`prepare_kms`] then [`spawn_kms`].
pub(crate) async fn start_kms(bins: &Path, root: &Path, env: &[(&str, &str)]) -> Result<KmsRun> {
    spawn_kms(bins, prepare_kms(bins, root)?, env).await
}

/// Starts a prepared KMS with `env` added to its environment (`PROGRESSDB_KMS__…`
/// overrides), and waits until it is ready.
pub(crate) async fn spawn_kms(bins: &Path, p: KmsPrepared, env: &[(&str, &str)]) -> Result<KmsRun> {
    let KmsPrepared {
        hsm,
        config,
        endpoint,
        root,
    } = p;
    let mut cmd = Command::new(bins.join("progressdb-kms"));
    cmd.env(hsm.conf_var, &hsm.conf)
        .env("RUST_LOG", child_log())
        // The benchmarks measure how fast keys can be made: the per-peer create budget
        // (limits.peer_create_rate_per_sec) would measure itself instead.
        .env("PROGRESSDB_KMS__LIMITS__PEER_CREATE_RATE_PER_SEC", "0")
        .envs(env.iter().copied())
        .arg("serve")
        .arg("--config")
        .arg(&config);
    let mut proc = harness("starting progressdb-kms", || {
        Proc::spawn("progressdb-kms", cmd, &root.join("kms.log"))
    })?;
    let mut cfg = KmsClientConfig::new(Endpoint::from_str(&endpoint)?, None);
    cfg.max_idle = 64;
    let client = KmsClient::new(cfg)?;
    let admin_sock = endpoint.replace("kms.sock", "kms.admin.sock");
    let admin = KmsClient::new(KmsClientConfig::new(Endpoint::from_str(&admin_sock)?, None))?;
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
        admin,
        _hsm: hsm,
    })
}

/// Counter value `name` from a Prometheus/OpenMetrics text (sum over label sets).
pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
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

/// A running `progressdb` with the external KMS, and an HTTP agent with a connection pool.
pub(crate) struct ServerRun {
    pub server: Server,
    pub agent: ureq::Agent,
}

impl ServerRun {
    pub(crate) fn start(
        bins: &Path,
        root: &Path,
        kms_endpoint: &str,
        encryption: bool,
    ) -> Result<Self> {
        let provider = Provider::External {
            endpoint: kms_endpoint.to_owned(),
            tls: None,
        };
        Self::start_on(bins, root, &provider, encryption)
    }

    /// A server on `provider` (e.g. several KMS replicas).
    pub(crate) fn start_on(
        bins: &Path,
        root: &Path,
        provider: &Provider,
        encryption: bool,
    ) -> Result<Self> {
        Self::start_with(bins, root, provider, encryption, None)
    }

    /// A server on `provider` whose messages are in the PostgreSQL database `postgres`, or
    /// in LMDB without one.
    pub(crate) fn start_with(
        bins: &Path,
        root: &Path,
        provider: &Provider,
        encryption: bool,
        postgres: Option<&str>,
    ) -> Result<Self> {
        let provider = provider.clone();
        let postgres = postgres.map(str::to_owned);
        need_bins(bins, &["progressdb"])?;
        std::fs::create_dir_all(root)?;
        let mut server = harness("server config", || {
            let b = ServerBuilder::new(root)
                .provider(&provider)
                .encryption(encryption);
            match &postgres {
                Some(url) => b.postgres_store(url),
                None => b,
            }
            .provision()
        })?;
        server.binary = bins.join("progressdb");
        let mut cmd = Command::new(&server.binary);
        cmd.env("RUST_LOG", child_log())
            .arg("serve")
            .arg("--config")
            .arg(&server.config);
        server.proc = harness("starting progressdb", || {
            Proc::spawn("progressdb", cmd, &root.join("server.log"))
        })?;
        // Configured with port 0, the server binds a free port itself: read it back.
        let port = harness("the server's port", || server.proc.wait_tcp_port())?;
        server.base = format!("http://127.0.0.1:{port}");
        let mut run = Self {
            server,
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
    pub(crate) fn call(
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

    pub(crate) fn stop(mut self) -> Result<()> {
        harness("stopping progressdb", || self.server.proc.sigterm()).map(drop)
    }
}

impl KmsRun {
    /// Stops the KMS (SIGTERM) and waits for it.
    pub(crate) fn stop(mut self) -> Result<()> {
        harness("stopping progressdb-kms", || self.proc.sigterm()).map(drop)
    }
}

// ---------------------------------------------------------------------------------------------
// The bare hyper server

/// A running `progressdb-bench serve-canned`: the same hyper version, runtime and Unix-socket
/// HTTP/1.1 set-up as the KMS, answering every request with one fixed body after reading the
/// request's body, and doing nothing else.
pub(crate) struct CannedRun {
    pub proc: Proc,
    pub endpoint: String,
}

impl CannedRun {
    /// Starts this executable as a canned server on `root/canned.sock` answering `body`.
    pub(crate) async fn start(root: &Path, body: &[u8]) -> Result<Self> {
        std::fs::create_dir_all(root)?;
        let sock = root.join("canned.sock");
        let file = root.join("canned.json");
        std::fs::write(&file, body)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("serve-canned").arg(&sock).arg(&file);
        let mut proc = harness("starting the canned server", || {
            Proc::spawn("canned", cmd, &root.join("canned.log"))
        })?;
        let endpoint = format!("unix://{}", sock.display());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(why) = exited(&mut proc) {
                bail!("{why}");
            }
            if Instant::now() > deadline {
                bail!("the canned server did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { proc, endpoint })
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        harness("stopping the canned server", || self.proc.sigterm()).map(drop)
    }
}

/// `progressdb-bench serve-canned SOCKET BODY_FILE`: serves until SIGTERM.
pub(crate) fn serve_canned(sock: &Path, body_file: &Path) -> Result<()> {
    use http_body_util::{BodyExt as _, Full};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioIo, TokioTimer};

    let body = bytes::Bytes::from(std::fs::read(body_file)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(sock);
        let listener = tokio::net::UnixListener::bind(sock)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let (stream, _) = tokio::select! {
                _ = term.recv() => break,
                a = listener.accept() => a?,
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        // Read the request like the KMS does before it answers.
                        let _ = req.into_body().collect().await;
                        let mut r = hyper::Response::new(Full::new(body));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
        let _ = std::fs::remove_file(sock);
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}
