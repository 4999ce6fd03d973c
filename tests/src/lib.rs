//! Harness of the end-to-end tests: a real SoftHSM token per test, real `progressdb-kms` and
//! `progressdb` processes, real LMDB files, real sockets and real TLS.
//!
//! Nothing here skips: a missing `softhsm2-util` or binary fails the test with a message that
//! says what to install or build. The binaries are taken from `E2E_BIN_DIR` (set by
//! `scripts/test.sh`, which builds both server flavours) or from `target/e2e/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod load;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use serde_json::Value;
use sha2::Sha256;

pub use testkit::{assert_absent, free_port, random_hex, write_secret, Certs, SOFTHSM_MODULE};

/// Directory holding the binaries under test.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("E2E_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary> -> target/e2e
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|t| t.join("e2e"))
        .expect("target dir")
}

/// A binary under test: `progressdb-kms`, `progressdb` (default features) or `progressdb-dev`
/// (built with `--features dev-embedded`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: run scripts/test.sh, which builds the binaries into target/e2e/ \
         (or set E2E_BIN_DIR)",
        p.display()
    );
    p
}

/// A SoftHSM token made for one test, in its own directory and config.
#[derive(Clone, Debug)]
pub struct SoftHsm {
    /// The PKCS#11 module (SoftHSM, or the token `PROGRESSDB_TEST_TOKEN` names).
    pub module: PathBuf,
    /// The module's config, named by `conf_var` in the environment of every process that
    /// loads it.
    pub conf: PathBuf,
    pub conf_var: &'static str,
    pub pin_file: PathBuf,
    pub pin: String,
    pub token_label: String,
    pub kek_label: String,
}

impl SoftHsm {
    /// Creates `root/softhsm/` with a config, a token directory and an initialised token.
    pub fn new(root: &Path) -> Self {
        let t = testkit::token::Token::create(&root.join("softhsm"), "progressdb-e2e");
        Self {
            module: t.module,
            conf: t.conf,
            conf_var: t.conf_var,
            pin_file: t.pin_file,
            pin: t.pin,
            token_label: t.label,
            kek_label: "progressdb-kek".into(),
        }
    }
}

/// A child process whose stdout and stderr go to a log file; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            name: name.into(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Sends `sig` and waits (at most 20 s) for the process to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("process already stopped");
        // Sending a signal to our own child, whose pid cannot have been reused: we have not
        // reaped it yet.
        let rc = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(rc.success(), "kill -{sig} {} failed", self.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not exit within 20 s of signal {sig}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process with SIGTERM if it still runs (before starting it again: the old
    /// one must have let go of its store and sockets).
    pub fn stop_if_running(&mut self) {
        let running = match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        };
        if running {
            self.sigterm();
        } else {
            self.child.take().map(|mut c| c.wait());
        }
    }

    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    pub fn sigkill(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL)
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait().unwrap() {
                panic!("{} exited with {st}:\n{}", self.name, self.log_text());
            }
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How the KMS listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KmsListen {
    Unix,
    Mtls,
}

/// A running `progressdb-kms` with its own SoftHSM token.
/// The log filter the services run with: `PROGRESSDB_E2E_LOG` (e.g. `trace`, for a test that
/// scans every line), default `debug`.
pub fn log_level() -> String {
    std::env::var("PROGRESSDB_E2E_LOG").unwrap_or_else(|_| "debug".into())
}

pub struct Kms {
    pub proc: Proc,
    pub config: PathBuf,
    pub endpoint: String,
    pub listen: KmsListen,
    pub root: PathBuf,
}

/// Where a test KMS keeps its key records.
#[derive(Clone, Debug, Default)]
pub enum KmsStore {
    /// LMDB in the KMS's own directory.
    #[default]
    Lmdb,
    /// A PostgreSQL database (a libpq connection string, e.g. from `testkit::pg`).
    Postgres(String),
}

/// Writes the KMS config for `root` and runs `init-kek` (twice: it must be idempotent).
pub fn kms_config(
    root: &Path,
    hsm: &SoftHsm,
    listen: KmsListen,
    certs: Option<&Certs>,
) -> (PathBuf, String) {
    kms_config_on(root, hsm, listen, certs, &KmsStore::Lmdb)
}

/// [`kms_config`] with the key records in `store`.
pub fn kms_config_on(
    root: &Path,
    hsm: &SoftHsm,
    listen: KmsListen,
    certs: Option<&Certs>,
    store: &KmsStore,
) -> (PathBuf, String) {
    let (config, endpoint) = write_kms_config(root, hsm, listen, certs, store);
    for _ in 0..2 {
        let out = Command::new(bin("progressdb-kms"))
            .env(hsm.conf_var, &hsm.conf)
            .arg("init-kek")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init-kek failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (config, endpoint)
}

/// The size a heavy end-to-end scenario runs at: `full` in the default pass, a tenth of it
/// (at least 1) in the passes that rerun a suite on another token or residency
/// (`PROGRESSDB_TEST_TOKEN`, `PROGRESSDB_TEST_RESIDENCY` set), which check the token's part,
/// not the load.
pub fn heavy(full: usize) -> usize {
    let rerun = ["PROGRESSDB_TEST_TOKEN", "PROGRESSDB_TEST_RESIDENCY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if rerun {
        (full / 10).max(1)
    } else {
        full
    }
}

/// The residency the suites run the KMS in: `PROGRESSDB_TEST_RESIDENCY` (`memory`, the
/// default, or `hsm`), so the same suites run in both (scripts/test.sh).
pub fn residency() -> String {
    std::env::var("PROGRESSDB_TEST_RESIDENCY").unwrap_or_else(|_| "memory".into())
}

fn residency_line() -> String {
    format!("dek_residency = \"{}\"\n", residency())
}

/// Writes the KMS config for `root` (records in `store`) without running `init-kek`.
pub fn write_kms_config(
    root: &Path,
    hsm: &SoftHsm,
    listen: KmsListen,
    certs: Option<&Certs>,
    store: &KmsStore,
) -> (PathBuf, String) {
    let dir = root.join("kms");
    fs::create_dir_all(dir.join("store")).unwrap();
    let (listen_toml, endpoint) = match listen {
        KmsListen::Unix => {
            let sock = dir.join("kms.sock");
            (
                format!(
                    "[listen]\nunix = \"{}\"\nsingle_user = true\n",
                    sock.display()
                ),
                format!("unix://{}", sock.display()),
            )
        }
        KmsListen::Mtls => {
            let c = certs.expect("mTLS needs certs");
            let port = free_port();
            (
                format!(
                    "[listen]\ntcp = \"127.0.0.1:{port}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
                    c.server_cert.display(),
                    c.server_key.display(),
                    c.ca.display()
                ),
                format!("https://localhost:{port}"),
            )
        }
    };
    let config = dir.join("kms.toml");
    fs::write(
        &config,
        format!(
            "{listen_toml}\n[hsm]\n{}module = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\nkek_label = \"{}\"\n\n[store]\npath = \"{}\"\n{}\n[cache]\nttl_secs = 300\nmax_entries = 1000\n",
            residency_line(),
            hsm.module.display(),
            hsm.token_label,
            hsm.pin_file.display(),
            hsm.kek_label,
            dir.join("store").display(),
            match store {
                KmsStore::Lmdb => String::new(),
                KmsStore::Postgres(url) => format!("backend = \"postgres\"\nurl = \"{url}\"\n"),
            }
        ),
    )
    .unwrap();
    (config, endpoint)
}

impl Kms {
    pub fn start(root: &Path, hsm: &SoftHsm, listen: KmsListen, certs: Option<&Certs>) -> Self {
        Self::start_with(root, hsm, listen, certs, "")
    }

    /// A KMS on a Unix socket under `root` whose key records are in `store`.
    pub fn start_on(root: &Path, hsm: &SoftHsm, store: &KmsStore, extra: &str) -> Self {
        let (config, endpoint) = kms_config_on(root, hsm, KmsListen::Unix, None, store);
        Self::launch(root, hsm, KmsListen::Unix, config, endpoint, extra)
    }

    /// Like [`Kms::start`], with `extra` TOML appended to the config (e.g. a `[limits]`
    /// section).
    pub fn start_with(
        root: &Path,
        hsm: &SoftHsm,
        listen: KmsListen,
        certs: Option<&Certs>,
        extra: &str,
    ) -> Self {
        let (config, endpoint) = kms_config(root, hsm, listen, certs);
        Self::launch(root, hsm, listen, config, endpoint, extra)
    }

    /// Starts a KMS on a config already written (e.g. by [`write_kms_config`]), with `extra`
    /// TOML appended.
    pub fn launch(
        root: &Path,
        hsm: &SoftHsm,
        listen: KmsListen,
        config: PathBuf,
        endpoint: String,
        extra: &str,
    ) -> Self {
        if !extra.is_empty() {
            let mut text = fs::read_to_string(&config).unwrap();
            text.push('\n');
            text.push_str(extra);
            fs::write(&config, text).unwrap();
        }
        let mut k = Kms {
            proc: Proc::spawn(
                "progressdb-kms",
                Command::new("true"),
                &root.join("kms.log"),
            ),
            config,
            endpoint,
            listen,
            root: root.to_owned(),
        };
        k.proc.child.take().map(|mut c| c.wait());
        k.restart(hsm);
        k
    }

    /// Runs `progressdb-kms serve` on this config (not this handle's process) and waits for
    /// it to exit, as a refused start must, within 30 s; returns its status and stderr.
    ///
    /// # Panics
    /// When it is still running after 30 s (it is killed first).
    pub fn serve_expecting_exit(&self, hsm: &SoftHsm) -> (std::process::ExitStatus, String) {
        let mut child = Command::new(bin("progressdb-kms"))
            .env(hsm.conf_var, &hsm.conf)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("progressdb-kms serve kept running where it must refuse to start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (Re)starts the process with the same config (stopping it first if it runs) and waits
    /// until it listens.
    pub fn restart(&mut self, hsm: &SoftHsm) {
        self.proc.stop_if_running();
        let mut cmd = Command::new(bin("progressdb-kms"));
        cmd.env(hsm.conf_var, &hsm.conf)
            .env("RUST_LOG", log_level())
            .arg("serve")
            .arg("--config")
            .arg(&self.config);
        self.proc = Proc::spawn("progressdb-kms", cmd, &self.root.join("kms.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.proc.assert_running();
            let up = match self.listen {
                // Both sockets: the admin one is bound just after the client one, and a
                // killed KMS leaves both files behind (connecting to them is refused).
                KmsListen::Unix => {
                    let client = PathBuf::from(self.endpoint.trim_start_matches("unix://"));
                    let stem = client.file_stem().unwrap_or_default().to_string_lossy();
                    let admin = client.with_file_name(format!("{stem}.admin.sock"));
                    std::os::unix::net::UnixStream::connect(&client).is_ok()
                        && std::os::unix::net::UnixStream::connect(&admin).is_ok()
                }
                KmsListen::Mtls => {
                    let port = self.endpoint.rsplit(':').next().unwrap();
                    std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok()
                }
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "KMS did not listen within 30 s:\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The usual system of an end-to-end test under `root`: a SoftHSM token, a KMS on a Unix
/// socket, and an encrypting `progressdb` using it.
pub fn system(root: &Path) -> (SoftHsm, Kms, Server) {
    let hsm = SoftHsm::new(root);
    let kms = Kms::start(root, &hsm, KmsListen::Unix, None);
    let provider = Provider::External {
        endpoint: kms.endpoint.clone(),
        tls: None,
    };
    let server = Server::start(root, "progressdb", &provider, true);
    (hsm, kms, server)
}

/// Which provider the server uses.
#[derive(Clone, Debug)]
pub enum Provider {
    /// `kms.mode = "external"` against `endpoint`; TLS files when it is https.
    External {
        endpoint: String,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    },
    /// `kms.mode = "external"` over several replicas (`kms.endpoints`), Unix sockets.
    Replicas { endpoints: Vec<String> },
    /// `kms.mode = "embedded"` with a master key file (dev builds only).
    Embedded { master_key_file: PathBuf },
}

/// API keys of a test server.
#[derive(Clone, Debug)]
pub struct Keys {
    pub admin: String,
    pub backend: String,
    pub frontend: String,
    pub signing_secret: String,
}

impl Keys {
    pub fn random() -> Self {
        Self {
            admin: format!("adm_{}", random_hex(16)),
            backend: format!("be_{}", random_hex(16)),
            frontend: format!("fe_{}", random_hex(16)),
            signing_secret: random_hex(32),
        }
    }

    /// Hex HMAC-SHA256 of `user` under the signing secret.
    pub fn sign(&self, user: &str) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(self.signing_secret.as_bytes()).unwrap();
        m.update(user.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }
}

/// A running `progressdb`.
pub struct Server {
    pub proc: Proc,
    pub config: PathBuf,
    pub base: String,
    pub keys: Keys,
    pub store: PathBuf,
    pub root: PathBuf,
    pub binary: PathBuf,
}

/// Writes a server config under `root/server/` and returns its path.
pub fn server_config(
    root: &Path,
    provider: &Provider,
    encryption: bool,
    port: u16,
) -> (PathBuf, Keys, PathBuf) {
    let dir = root.join("server");
    let store = dir.join("store");
    fs::create_dir_all(&store).unwrap();
    let keys = Keys::random();
    let keys_file = dir.join("keys.toml");
    write_secret(
        &keys_file,
        format!(
            "admin = [\"{}\"]\nbackend = [\"{}\"]\nfrontend = [\"{}\"]\nsigning_secret = \"{}\"\n",
            keys.admin, keys.backend, keys.frontend, keys.signing_secret
        )
        .as_bytes(),
    );
    let kms = match provider {
        Provider::External { endpoint, tls } => {
            let mut s = format!("mode = \"external\"\nendpoint = \"{endpoint}\"\n");
            if let Some((ca, cert, key)) = tls {
                s.push_str(&format!(
                    "ca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
                    ca.display(),
                    cert.display(),
                    key.display()
                ));
            }
            s
        }
        Provider::Replicas { endpoints } => format!(
            "mode = \"external\"\nendpoints = [{}]\nhealth_interval_ms = 200\n",
            endpoints
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Provider::Embedded { master_key_file } => format!(
            "mode = \"embedded\"\nmaster_key_file = \"{}\"\n",
            master_key_file.display()
        ),
    };
    let config = dir.join("server.toml");
    fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n\n[store]\npath = \"{}\"\n\n[auth]\nkeys_file = \"{}\"\n\n[encryption]\nenabled = {encryption}\n\n[kms]\n{kms}",
            store.display(),
            keys_file.display()
        ),
    )
    .unwrap();
    (config, keys, store)
}

impl Server {
    /// Starts `binary` (`progressdb` or `progressdb-dev`) and waits for `/healthz`.
    pub fn start(root: &Path, binary: &str, provider: &Provider, encryption: bool) -> Self {
        let port = free_port();
        let (config, keys, store) = server_config(root, provider, encryption, port);
        let mut s = Server {
            proc: Proc::spawn("progressdb", Command::new("true"), &root.join("server.log")),
            config,
            base: format!("http://127.0.0.1:{port}"),
            keys,
            store,
            root: root.to_owned(),
            binary: bin(binary),
        };
        s.proc.child.take().map(|mut c| c.wait());
        s.restart();
        s
    }

    /// (Re)starts the server, stopping it first if it runs, and waits for `/healthz`.
    pub fn restart(&mut self) {
        self.proc.stop_if_running();
        let mut cmd = Command::new(&self.binary);
        cmd.env("RUST_LOG", log_level())
            .arg("serve")
            .arg("--config")
            .arg(&self.config);
        self.proc = Proc::spawn("progressdb", cmd, &self.root.join("server.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.proc.assert_running();
            if let Ok(r) = ureq::get(&format!("{}/healthz", self.base))
                .timeout(Duration::from_secs(2))
                .call()
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not answer /healthz within 30 s:\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client acting as `role` for `user`.
    pub fn as_role(&self, role: Role, user: &str) -> Api {
        let (key, sig) = match role {
            Role::Admin => (self.keys.admin.clone(), None),
            Role::Backend => (self.keys.backend.clone(), None),
            Role::Frontend => (self.keys.frontend.clone(), Some(self.keys.sign(user))),
        };
        Api {
            base: self.base.clone(),
            key,
            user: Some(user.to_owned()),
            signature: sig,
        }
    }

    /// Every byte of every file in the server's LMDB directory.
    pub fn store_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for e in fs::read_dir(&self.store).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                all.extend(fs::read(p).unwrap());
            }
        }
        all
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Backend,
    Frontend,
}

/// A small blocking HTTP client for the server API.
#[derive(Clone, Debug)]
pub struct Api {
    pub base: String,
    pub key: String,
    pub user: Option<String>,
    pub signature: Option<String>,
}

impl Api {
    /// Sends one request with this caller's headers on `agent` (which carries the timeouts and
    /// the keep-alive pool); returns the status and the body text of any answer, error
    /// statuses included.
    ///
    /// # Errors
    /// Transport failures (connection refused, reset, timeout).
    pub fn send(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), Box<ureq::Transport>> {
        let mut req = agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key));
        if let Some(u) = &self.user {
            req = req.set("X-User-ID", u);
        }
        if let Some(s) = &self.signature {
            req = req.set("X-User-Signature", s);
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(Box::new(t)),
        };
        let status = resp.status();
        Ok((status, resp.into_string().unwrap_or_default()))
    }

    /// Sends a request; returns the status and the JSON body (`Value::Null` when empty).
    /// Panics on transport failures.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
        let agent = AGENT.get_or_init(|| {
            ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .build()
        });
        let (status, text) = self
            .send(agent, method, path, body.as_ref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    pub fn create_thread(&self, title: &str) -> Value {
        let (s, v) = self.call(
            "POST",
            "/v1/threads",
            Some(serde_json::json!({ "title": title })),
        );
        assert_eq!(s, 201, "create thread: {v}");
        v
    }

    pub fn post_message(&self, thread: &str, body: Value) -> Value {
        let (s, v) = self.call(
            "POST",
            &format!("/v1/threads/{thread}/messages"),
            Some(serde_json::json!({ "body": body })),
        );
        assert_eq!(s, 201, "post message: {v}");
        v
    }

    /// Every message of a thread, oldest first, following cursors.
    pub fn all_messages(&self, thread: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/threads/{thread}/messages?limit=50&order=asc");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (s, v) = self.call("GET", &path, None);
            assert_eq!(s, 200, "list messages: {v}");
            out.extend(v["messages"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) if !c.is_empty() => cursor = Some(c.to_owned()),
                _ => return out,
            }
        }
    }
}

/// What [`functional_flow`] leaves behind, for further checks.
#[derive(Debug)]
pub struct FlowOutcome {
    pub thread_id: String,
    /// Plaintext markers that were posted (and must never reach disk or logs).
    pub markers: Vec<String>,
    /// Base64 wrapped DEK shown to the admin (when encryption is on).
    pub wrapped_dek: Option<String>,
}

/// The functional contract of the server, identical for every provider: threads and messages
/// CRUD, ordering, roles. Panics on the first deviation.
pub fn functional_flow(server: &Server, encrypted: bool) -> FlowOutcome {
    use serde_json::json;
    let alice = server.as_role(Role::Frontend, "alice");
    let bob = server.as_role(Role::Frontend, "bob");
    let admin = server.as_role(Role::Admin, "alice");

    let t = alice.create_thread("e2e thread");
    let tid = t["id"].as_str().expect("thread id").to_owned();
    assert_eq!(t["title"], "e2e thread");
    assert_eq!(t["author"], "alice");
    assert!(
        t.get("kms").is_none() || t["kms"].is_null(),
        "frontend must not see kms: {t}"
    );

    let run = random_hex(6);
    let markers: Vec<String> = (0..5)
        .map(|i| format!("PLAINTEXT-MARKER-{run}-{i}"))
        .collect();
    let mut ids = Vec::new();
    for m in &markers {
        let v = alice.post_message(&tid, json!({ "text": m, "n": 1 }));
        assert_eq!(v["thread_id"], tid.as_str());
        assert_eq!(v["author"], "alice");
        assert_eq!(v["body"]["text"], m.as_str());
        ids.push(v["id"].as_str().expect("message id").to_owned());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "message ids must sort in posting order");

    // Read back, oldest first and newest first.
    let all = alice.all_messages(&tid);
    let texts: Vec<&str> = all
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        markers.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let (s, v) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages?order=desc&limit=2"),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let page: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(page, vec![markers[4].as_str(), markers[3].as_str()]);
    assert!(v["next_cursor"].as_str().is_some_and(|c| !c.is_empty()));

    // One message: get, edit, delete.
    let (s, v) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages/{}", ids[1]),
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["body"]["text"], markers[1].as_str());
    let edited = format!("EDITED-MARKER-{run}");
    let (s, v) = alice.call(
        "PUT",
        &format!("/v1/threads/{tid}/messages/{}", ids[1]),
        Some(json!({ "body": { "text": edited } })),
    );
    assert_eq!(s, 200, "{v}");
    let (_, v) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages/{}", ids[1]),
        None,
    );
    assert_eq!(v["body"]["text"], edited.as_str());
    let (s, v) = alice.call(
        "DELETE",
        &format!("/v1/threads/{tid}/messages/{}", ids[2]),
        None,
    );
    assert!(s == 200 || s == 204, "delete message: {s} {v}");
    let (s, _) = alice.call(
        "GET",
        &format!("/v1/threads/{tid}/messages/{}", ids[2]),
        None,
    );
    assert_eq!(s, 404);
    assert_eq!(alice.all_messages(&tid).len(), 4);

    // Rename; another user sees nothing of it.
    let (s, v) = alice.call(
        "PATCH",
        &format!("/v1/threads/{tid}"),
        Some(json!({ "title": "renamed" })),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["title"], "renamed");
    let (s, _) = bob.call("GET", &format!("/v1/threads/{tid}"), None);
    assert!(s == 404 || s == 403, "bob read alice's thread: {s}");
    let (s, _) = bob.call("GET", &format!("/v1/threads/{tid}/messages"), None);
    assert!(s == 404 || s == 403, "bob listed alice's messages: {s}");
    let (s, v) = bob.call("GET", "/v1/threads", None);
    assert_eq!(s, 200);
    assert!(v["threads"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["id"] != tid.as_str()));

    // Admin sees the KMS metadata.
    let (s, k) = admin.call("GET", &format!("/admin/threads/{tid}/kms"), None);
    let wrapped_dek = if encrypted {
        assert_eq!(s, 200, "{k}");
        assert!(k["key_id"].as_str().unwrap().starts_with("dek_"), "{k}");
        assert!(
            k["wrapped_dek"].as_str().is_some_and(|w| w.len() > 40),
            "{k}"
        );
        assert_eq!(k["kek_version"], 1);
        let (s, _) = alice.call("GET", &format!("/admin/threads/{tid}/kms"), None);
        assert!(s == 401 || s == 403, "frontend reached an admin route: {s}");
        k["wrapped_dek"].as_str().map(str::to_owned)
    } else {
        None
    };

    let mut all_markers = markers;
    all_markers.push(edited);
    FlowOutcome {
        thread_id: tid,
        markers: all_markers,
        wrapped_dek,
    }
}

impl Server {
    /// Status and body of `GET /readyz`.
    pub fn proc_ready_status(&self) -> (u16, Value) {
        Api {
            base: self.base.clone(),
            key: String::new(),
            user: None,
            signature: None,
        }
        .call("GET", "/readyz", None)
    }
}

/// One HTTP/1.1 request over a Unix socket (`Connection: close`), blocking, with a 10 s
/// timeout: for talking to the KMS from tests without a client library. Returns the status
/// and the body as text.
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

/// The value of an un-labelled metric in Prometheus text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

impl Kms {
    /// The Unix socket path (for a `KmsListen::Unix` KMS).
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(self.endpoint.trim_start_matches("unix://"))
    }

    /// One request to the KMS's Unix socket; see [`uds_request`].
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        uds_request(&self.socket(), method, path, body.as_ref()).unwrap()
    }

    /// `progressdb-kms ARGS --config <this KMS's config>`, with the token's environment.
    pub fn cli(&self, hsm: &SoftHsm, args: &[&str]) -> std::process::Output {
        Command::new(bin("progressdb-kms"))
            .env(hsm.conf_var, &hsm.conf)
            .env("RUST_LOG", "warn")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// [`Kms::cli`] that must succeed and print JSON.
    pub fn cli_json(&self, hsm: &SoftHsm, args: &[&str]) -> Value {
        let out = self.cli(hsm, args);
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

    /// The KMS's `/metrics` text.
    pub fn metrics(&self) -> String {
        uds_raw(&self.socket(), "GET", "/metrics", None).unwrap().1
    }
}
