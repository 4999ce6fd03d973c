//! The one process harness of the KMS, for `kms-hsm/tests` and the end-to-end tests: a
//! [`KmsBuilder`] writes a `progressdb-kms` config from typed options (listener, store,
//! residency, limits, ...), runs `init-kek`, and starts `progressdb-kms serve` as a child
//! process ([`Kms`]) with its output in a log file that tests scan for secrets. PKCS#11 can be
//! initialised only once per process, so the KMS always runs in a process of its own.
//!
//! Layout under the builder's root: `kms/kms.toml`, `kms/store/`, `kms/kms.sock` (and
//! `kms/kms.admin.sock`), the log `kms.log`, and the token (when the builder makes one) in
//! `softhsm/`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_api::{Endpoint, KmsClient, KmsClientConfig};
use serde_json::Value;

use crate::proc::{bin, log_level, Proc};
use crate::token::Token;
use crate::Certs;

/// The KEK label every test KMS uses unless told otherwise.
pub const KEK_LABEL: &str = "progressdb-kek";

/// The token label a builder gives the token it makes.
pub const TOKEN_LABEL: &str = "progressdb-e2e";

/// How the KMS listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KmsListen {
    /// A Unix socket (and its admin socket beside it).
    Unix,
    /// TCP on 127.0.0.1 with mutual TLS (a port the KMS binds itself).
    Mtls,
}

/// Where a test KMS keeps its key records.
#[derive(Clone, Debug, Default)]
pub enum KmsStore {
    /// LMDB in the KMS's own directory.
    #[default]
    Lmdb,
    /// A PostgreSQL database (a libpq connection string, e.g. from [`crate::pg`]).
    Postgres(String),
}

/// Where the KMS keeps DEKs while it uses them (`hsm.dek_residency`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    Memory,
    Hsm,
}

impl Residency {
    /// The residency the suites run the KMS in: `PROGRESSDB_TEST_RESIDENCY` (`memory`, the
    /// default, or `hsm`), so the same suites run in both (scripts/test.sh).
    pub fn of_run() -> Self {
        match std::env::var("PROGRESSDB_TEST_RESIDENCY").as_deref() {
            Ok("hsm") => Residency::Hsm,
            Err(_) | Ok("") | Ok("memory") => Residency::Memory,
            Ok(other) => panic!("PROGRESSDB_TEST_RESIDENCY={other:?}: use memory or hsm"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Residency::Memory => "memory",
            Residency::Hsm => "hsm",
        }
    }
}

/// Typed options of a test KMS; see the module docs. Defaults: a Unix socket for one user
/// (`single_user`), LMDB, this run's residency and token, `init-kek` run twice (it must be
/// idempotent), the binary from [`bin`].
#[derive(Debug)]
pub struct KmsBuilder {
    root: PathBuf,
    temp: Option<tempfile::TempDir>,
    token: Option<Token>,
    kek_label: String,
    listen: KmsListen,
    certs: Option<Certs>,
    allowed_uids: Option<Vec<u32>>,
    store: KmsStore,
    map_size_mb: Option<u64>,
    residency: Residency,
    sessions: Option<u32>,
    cache: (u64, u64),
    limits: Vec<(&'static str, u64)>,
    lifecycle: Vec<(&'static str, u64)>,
    extra: String,
    rust_log: String,
    env: Vec<(String, String)>,
    binary: Option<PathBuf>,
    init_kek_runs: usize,
}

impl KmsBuilder {
    /// A KMS whose files go under `root` (see the module docs).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            temp: None,
            token: None,
            kek_label: KEK_LABEL.into(),
            listen: KmsListen::Unix,
            certs: None,
            allowed_uids: None,
            store: KmsStore::Lmdb,
            map_size_mb: None,
            residency: Residency::of_run(),
            sessions: None,
            cache: (300, 1000),
            limits: Vec::new(),
            lifecycle: Vec::new(),
            extra: String::new(),
            rust_log: log_level(),
            env: Vec::new(),
            binary: None,
            init_kek_runs: 2,
        }
    }

    /// A KMS in a temp directory of its own, removed when the [`Kms`] is dropped (in the system
    /// temp dir: Unix socket paths are limited to ~107 bytes).
    pub fn temp() -> Self {
        let dir = tempfile::Builder::new().prefix("kms-").tempdir().unwrap();
        let mut b = Self::new(dir.path());
        b.temp = Some(dir);
        b
    }

    /// Uses `token` (shared with other KMSs or tools) instead of making one.
    pub fn token(mut self, token: &Token) -> Self {
        self.token = Some(token.clone());
        self
    }

    pub fn kek_label(mut self, label: &str) -> Self {
        self.kek_label = label.into();
        self
    }

    /// Mutual TLS on 127.0.0.1 with `certs` (see [`KmsBuilder::tls`] to have them made).
    pub fn mtls(mut self, certs: &Certs) -> Self {
        self.listen = KmsListen::Mtls;
        self.certs = Some(certs.clone());
        self
    }

    /// Mutual TLS with certificates made in the KMS's directory.
    pub fn tls(mut self) -> Self {
        self.listen = KmsListen::Mtls;
        self.certs = None;
        self
    }

    /// `listen.allowed_uids` instead of `single_user` (Unix socket only).
    pub fn allowed_uids(mut self, uids: Vec<u32>) -> Self {
        self.allowed_uids = Some(uids);
        self
    }

    pub fn store(mut self, store: KmsStore) -> Self {
        self.store = store;
        self
    }

    /// `store.map_size_mb` (LMDB).
    pub fn map_size_mb(mut self, mb: u64) -> Self {
        self.map_size_mb = Some(mb);
        self
    }

    pub fn residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    /// `hsm.sessions`.
    pub fn sessions(mut self, n: u32) -> Self {
        self.sessions = Some(n);
        self
    }

    /// `cache.ttl_secs` and `cache.max_entries`.
    pub fn cache(mut self, ttl_secs: u64, max_entries: u64) -> Self {
        self.cache = (ttl_secs, max_entries);
        self
    }

    /// One `[limits]` key (the typed helpers below cover the usual ones).
    pub fn limit(mut self, key: &'static str, value: u64) -> Self {
        self.limits.retain(|(k, _)| *k != key);
        self.limits.push((key, value));
        self
    }

    /// `limits.max_body_bytes`.
    pub fn max_body_bytes(self, n: u64) -> Self {
        self.limit("max_body_bytes", n)
    }

    /// `limits.read_timeout_secs` and `limits.shutdown_timeout_secs`.
    pub fn timeouts(self, read_secs: u64, shutdown_secs: u64) -> Self {
        self.limit("read_timeout_secs", read_secs)
            .limit("shutdown_timeout_secs", shutdown_secs)
    }

    /// `limits.max_connections` and `limits.max_connections_per_peer`.
    pub fn max_connections(self, total: u64, per_peer: u64) -> Self {
        self.limit("max_connections", total)
            .limit("max_connections_per_peer", per_peer)
    }

    /// `limits.peer_rate_per_sec` and `limits.peer_rate_burst`.
    pub fn peer_rate(self, per_sec: u64, burst: u64) -> Self {
        self.limit("peer_rate_per_sec", per_sec)
            .limit("peer_rate_burst", burst)
    }

    /// `lifecycle.rewrap_concurrency` and `lifecycle.rewrap_batch`.
    pub fn rewrap(mut self, concurrency: u64, batch: u64) -> Self {
        self.lifecycle = vec![("rewrap_concurrency", concurrency), ("rewrap_batch", batch)];
        self
    }

    /// Arbitrary TOML appended to the config: for a test of config parsing, or a section no
    /// typed option covers (it must not repeat a section the options write).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self
    }

    /// `RUST_LOG` of the KMS (default [`log_level`]).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// An environment variable of every KMS command.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The `progressdb-kms` binary (default: [`bin`]`("progressdb-kms")`; the KMS's own tests
    /// pass `env!("CARGO_BIN_EXE_progressdb-kms")`).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// How often `init-kek` runs before serving (default 2: the second run checks that it is
    /// idempotent; 0 leaves the token without a KEK).
    pub fn init_kek_runs(mut self, n: usize) -> Self {
        self.init_kek_runs = n;
        self
    }

    fn toml(&self, dir: &Path, token: &Token, certs: Option<&Certs>) -> String {
        let mut t = String::from("[listen]\n");
        match self.listen {
            KmsListen::Unix => {
                writeln!(t, "unix = {:?}", dir.join("kms.sock")).unwrap();
                match &self.allowed_uids {
                    Some(u) => writeln!(t, "allowed_uids = {u:?}").unwrap(),
                    // The tests run the KMS, its clients and its admin commands as one user.
                    None => t.push_str("single_user = true\n"),
                }
            }
            KmsListen::Mtls => {
                let c = certs.expect("mutual TLS needs certificates");
                // Port 0: the KMS binds a free port; `Kms::start` reads it back and pins it
                // in this file, so a restart keeps the endpoint.
                writeln!(
                    t,
                    "tcp = \"127.0.0.1:0\"\n\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}",
                    c.server_cert, c.server_key, c.ca
                )
                .unwrap();
            }
        }
        writeln!(
            t,
            "\n[hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = {:?}\nkek_label = {:?}\ndek_residency = {:?}",
            token.module,
            token.label,
            token.pin_file,
            self.kek_label,
            self.residency.name()
        )
        .unwrap();
        if let Some(n) = self.sessions {
            writeln!(t, "sessions = {n}").unwrap();
        }
        writeln!(t, "\n[store]\npath = {:?}", dir.join("store")).unwrap();
        match &self.store {
            KmsStore::Lmdb => {}
            KmsStore::Postgres(url) => {
                writeln!(t, "backend = \"postgres\"\nurl = {url:?}").unwrap();
            }
        }
        if let Some(mb) = self.map_size_mb {
            writeln!(t, "map_size_mb = {mb}").unwrap();
        }
        writeln!(
            t,
            "\n[cache]\nttl_secs = {}\nmax_entries = {}",
            self.cache.0, self.cache.1
        )
        .unwrap();
        for (name, keys) in [("limits", &self.limits), ("lifecycle", &self.lifecycle)] {
            if !keys.is_empty() {
                writeln!(t, "\n[{name}]").unwrap();
                for (k, v) in keys {
                    writeln!(t, "{k} = {v}").unwrap();
                }
            }
        }
        t.push_str(&self.extra);
        t
    }

    /// Writes the token (unless one was given), certificates and config, and runs `init-kek`
    /// as often as asked; starts nothing.
    pub fn provision(self) -> Kms {
        let dir = self.root.join("kms");
        fs::create_dir_all(dir.join("store")).unwrap();
        let token = self
            .token
            .clone()
            .unwrap_or_else(|| Token::create(&self.root.join("softhsm"), TOKEN_LABEL));
        let certs = match (self.listen, &self.certs) {
            (KmsListen::Mtls, None) => Some(Certs::generate(&dir.join("certs"))),
            (_, c) => c.clone(),
        };
        let config = dir.join("kms.toml");
        fs::write(&config, self.toml(&dir, &token, certs.as_ref())).unwrap();
        let endpoint = match self.listen {
            KmsListen::Unix => format!("unix://{}", dir.join("kms.sock").display()),
            // Known once the KMS has bound its port (`Kms::start`).
            KmsListen::Mtls => "https://localhost:0".into(),
        };
        let kms = Kms {
            proc: Proc::none("progressdb-kms", &self.root.join("kms.log")),
            config,
            endpoint,
            listen: self.listen,
            root: self.root.clone(),
            token,
            kek_label: self.kek_label.clone(),
            certs,
            rust_log: self.rust_log.clone(),
            env: self.env.clone(),
            binary: self.binary.clone().unwrap_or_else(|| bin("progressdb-kms")),
            _temp: self.temp,
        };
        for _ in 0..self.init_kek_runs {
            let out = kms.command(&["init-kek"]).output().unwrap();
            kms.proc.append_log(&out.stdout);
            kms.proc.append_log(&out.stderr);
            assert!(
                out.status.success(),
                "init-kek failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        kms
    }

    /// [`KmsBuilder::provision`], then starts the KMS and waits until it listens.
    pub fn start(self) -> Kms {
        let mut kms = self.provision();
        kms.restart();
        kms
    }

    /// [`KmsBuilder::start`], then waits until `/readyz` answers 200.
    pub async fn start_ready(self) -> Kms {
        let mut kms = self.start();
        kms.wait_status(200).await;
        kms
    }
}

/// One KMS under test: its config, token, log and (when running) process.
#[derive(Debug)]
pub struct Kms {
    pub proc: Proc,
    pub config: PathBuf,
    /// `unix://<socket>` or `https://localhost:<port>`.
    pub endpoint: String,
    pub listen: KmsListen,
    /// The directory the builder was given (the KMS's files are in `root/kms/`).
    pub root: PathBuf,
    pub token: Token,
    pub kek_label: String,
    /// The TLS material of a [`KmsListen::Mtls`] KMS.
    pub certs: Option<Certs>,
    pub rust_log: String,
    /// Extra environment of every KMS command (changeable between starts).
    pub env: Vec<(String, String)>,
    pub binary: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Kms {
    /// A `progressdb-kms ARGS --config <config>` command with the token's environment, this
    /// KMS's `RUST_LOG` and extra environment (and no PIN from the caller's environment).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env(self.token.conf_var, &self.token.conf)
            .env("RUST_LOG", &self.rust_log)
            .env_remove("PROGRESSDB_KMS_HSM_PIN");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `progressdb-kms ARGS` on this config (`RUST_LOG=warn`) to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command(args).env("RUST_LOG", "warn").output().unwrap()
    }

    /// [`Kms::cli`] that must succeed and print JSON.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Rewrites the config file.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let old = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, f(old)).unwrap();
    }

    /// The client Unix socket (of a [`KmsListen::Unix`] KMS).
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(self.endpoint.trim_start_matches("unix://"))
    }

    /// The admin Unix socket beside the client one.
    pub fn admin_socket(&self) -> PathBuf {
        let client = self.socket();
        let stem = client.file_stem().unwrap_or_default().to_string_lossy();
        client.with_file_name(format!("{stem}.admin.sock"))
    }

    /// The TCP port of a [`KmsListen::Mtls`] KMS (once started).
    pub fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn log(&self) -> &Path {
        &self.proc.log
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Starts `serve` without waiting for anything (see [`Kms::wait_listening`]).
    pub fn spawn(&mut self) {
        assert!(!self.proc.is_running(), "already running");
        let log = self.proc.log.clone();
        self.proc = Proc::spawn("progressdb-kms", self.command(&["serve"]), &log);
    }

    /// (Re)starts `serve` with the same config (stopping it first if it runs) and waits until
    /// it listens. A mutual-TLS KMS started for the first time binds a port of its own
    /// choosing, which is read back and written into the config (a restart keeps it).
    pub fn restart(&mut self) {
        self.proc.stop_if_running();
        self.spawn();
        if self.listen == KmsListen::Mtls && self.endpoint.ends_with(":0") {
            let port = self.proc.wait_tcp_port();
            self.edit_config(|t| {
                t.replace(
                    "tcp = \"127.0.0.1:0\"",
                    &format!("tcp = \"127.0.0.1:{port}\""),
                )
            });
            self.endpoint = format!("https://localhost:{port}");
        }
        self.wait_listening();
    }

    /// Waits (at most 30 s) until the KMS accepts connections: on both Unix sockets (the
    /// admin one is bound just after the client one, and a killed KMS leaves both files
    /// behind, refusing connections), or on its TCP port.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.proc.assert_running();
            let up = match self.listen {
                KmsListen::Unix => {
                    std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
                        && std::os::unix::net::UnixStream::connect(self.admin_socket()).is_ok()
                }
                KmsListen::Mtls => std::net::TcpStream::connect(("127.0.0.1", self.port())).is_ok(),
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "KMS did not listen within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `serve` on this config (not this handle's process) and waits for it to exit, as a
    /// refused start must, within 30 s; returns its status and its stdout and stderr, which
    /// are also appended to the log.
    ///
    /// # Panics
    /// When it is still running after 30 s (it is killed first).
    pub fn serve_expecting_exit(&self) -> (ExitStatus, String) {
        let mut child = self
            .command(&["serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("progressdb-kms serve kept running where it must refuse to start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        self.proc.append_log(&out.stdout);
        self.proc.append_log(&out.stderr);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        self.proc.signal(libc::SIGTERM);
    }

    /// Waits for the process to exit (at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.proc.wait_exit(timeout)
    }

    /// SIGKILL (a crash): nothing is cleaned up, the socket files stay behind.
    pub fn crash(&mut self) {
        self.proc.sigkill();
    }

    /// SIGTERM, then expects a clean exit 0 within 20 s.
    pub fn stop(&mut self) {
        let status = self.proc.sigterm();
        assert!(
            status.success(),
            "KMS exited with {status}:\n{}",
            self.log_text()
        );
    }

    /// Stops the KMS if running and checks that the whole log holds none of `secrets` (nor
    /// the PIN) in any common encoding.
    pub fn finish(mut self, secrets: &[&[u8]]) {
        if self.proc.is_running() {
            self.stop();
        }
        let mut all: Vec<&[u8]> = secrets.to_vec();
        all.push(self.token.pin.as_bytes());
        crate::assert_absent("KMS log", &fs::read(self.log()).unwrap_or_default(), &all);
    }

    /// The endpoint as the client library takes it.
    pub fn client_endpoint(&self) -> Endpoint {
        match self.listen {
            KmsListen::Unix => Endpoint::Unix(self.socket()),
            KmsListen::Mtls => Endpoint::Https {
                host: "localhost".into(),
                port: self.port(),
            },
        }
    }

    /// A client with this KMS's default identity (the good client certificate under mTLS),
    /// no retries.
    pub fn client(&self) -> KmsClient {
        let tls = self
            .certs
            .as_ref()
            .map(|c| client_tls(c, Some((c.client_cert.as_path(), c.client_key.as_path()))));
        self.client_with(tls)
    }

    /// A client presenting `tls` (see [`client_tls`]), no retries.
    pub fn client_with(&self, tls: Option<Arc<rustls::ClientConfig>>) -> KmsClient {
        let mut cfg = KmsClientConfig::new(self.client_endpoint(), tls);
        cfg.max_retries = 0;
        cfg.max_idle = 64;
        cfg.request_timeout = Duration::from_secs(20);
        KmsClient::new(cfg).unwrap()
    }

    /// Waits (at most 30 s) until `/readyz` answers `want`; fails with the log when the KMS
    /// exits first.
    pub async fn wait_status(&mut self, want: u16) {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.proc.assert_running();
            if let Ok((s, _)) = client.raw(http::Method::GET, "/readyz", Vec::new()).await {
                if s == want {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "KMS /readyz did not answer {want} within 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Kms::wait_status`] 200.
    pub async fn wait_ready(&mut self) {
        self.wait_status(200).await;
    }

    /// The value of one metric line (`name{labels} value`) from `/metrics`, via the client.
    pub async fn metric(&self, line_prefix: &str) -> Option<f64> {
        let (status, body) = self
            .client()
            .raw(http::Method::GET, "/metrics", Vec::new())
            .await
            .unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8(body.to_vec()).unwrap();
        text.lines()
            .find(|l| l.starts_with(line_prefix) && l[line_prefix.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// One blocking request to the KMS's Unix socket; see [`uds_request`].
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        uds_request(&self.socket(), method, path, body.as_ref()).unwrap()
    }

    /// Creates the DEK of `thread_id` (Unix socket); must succeed. Returns its key id.
    pub fn create_dek(&self, thread_id: &str) -> String {
        let (s, k) = self.call(
            "POST",
            "/create_dek_for_thread",
            Some(serde_json::json!({ "thread_id": thread_id })),
        );
        assert_eq!(s, 200, "create_dek_for_thread: {k}");
        k["key_id"].as_str().unwrap().to_owned()
    }

    /// The KMS's `/metrics` text (Unix socket).
    pub fn metrics(&self) -> String {
        uds_raw(&self.socket(), "GET", "/metrics", None).unwrap().1
    }
}

/// A client TLS config trusting the test CA and presenting `cert`/`key` (or no certificate).
pub fn client_tls(certs: &Certs, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    match identity {
        Some((cert, key)) => Arc::new(kms_api::tls::client_config(&certs.ca, cert, key).unwrap()),
        None => {
            let roots = kms_api::tls::load_roots(&certs.ca).unwrap();
            let mut cfg = rustls::ClientConfig::builder_with_provider(kms_api::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        }
    }
}

/// One HTTP/1.1 request over a Unix socket (`Connection: close`), blocking, with a 10 s
/// timeout: for talking to the KMS without a client library. Returns the status and the body
/// as text.
///
/// # Errors
/// Connection and I/O failures, and an answer that is not HTTP.
pub fn uds_raw(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = body
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: kms\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(&body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// [`uds_raw`] with the body parsed as JSON (`Null` when it is not JSON).
///
/// # Errors
/// As [`uds_raw`].
pub fn uds_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let (status, text) = uds_raw(sock, method, path, body)?;
    Ok((
        status,
        serde_json::from_str(text.trim()).unwrap_or(Value::Null),
    ))
}
