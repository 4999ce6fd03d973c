//! Harness of the end-to-end KMS tests: each test gets its own temp directory with a SoftHSM
//! config and token, a 0600 PIN file, an LMDB store and a config file, runs
//! `progressdb-kms init-kek` and then `progressdb-kms serve` as a child process (PKCS#11 can be
//! initialised only once per process), with stdout and stderr appended to one log file that
//! tests scan for secrets. SoftHSM missing is a failure, never a skip.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kms_api::{Endpoint, KmsClient, KmsClientConfig};

pub const KEK_LABEL: &str = "test-kek";
pub const BIN: &str = env!("CARGO_BIN_EXE_progressdb-kms");

pub use testkit::{free_port, random_hex, Certs};

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// A client config trusting the test CA and presenting `cert`/`key` (or no certificate).
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

/// How a test KMS is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub tls: bool,
    pub max_body_bytes: Option<u64>,
    pub allowed_uids: Option<Vec<u32>>,
    pub cache_max_entries: Option<u64>,
    pub sessions: Option<u32>,
    /// `RUST_LOG` of the child (default `info`).
    pub rust_log: Option<String>,
    /// Extra environment of the child.
    pub env: Vec<(String, String)>,
    /// Do not run `init-kek` while provisioning.
    pub skip_init_kek: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: false,
            max_body_bytes: None,
            allowed_uids: None,
            cache_max_entries: None,
            sessions: Some(2),
            rust_log: None,
            env: Vec::new(),
            skip_init_kek: false,
        }
    }
}

/// One KMS under test, with its own token, store and log.
#[derive(Debug)]
pub struct Kms {
    pub dir: tempfile::TempDir,
    /// The token's module config (`SOFTHSM2_CONF` / `KRYOPTIC_CONF`, as `conf_var` says).
    pub token_conf: PathBuf,
    pub conf_var: &'static str,
    pub config: PathBuf,
    pub pin: String,
    pub pin_file: PathBuf,
    pub socket: PathBuf,
    pub store: PathBuf,
    pub log: PathBuf,
    pub certs: Option<Certs>,
    pub port: u16,
    pub opts: Options,
    child: Option<Child>,
}

impl Kms {
    /// Makes the token, PIN file, certs and config; runs `init-kek`. Does not start serving.
    pub fn provision(opts: Options) -> Kms {
        // The system temp dir keeps the socket path short (Unix socket paths max ~107 bytes).
        let dir = tempfile::Builder::new().prefix("kms-").tempdir().unwrap();
        let d = dir.path().to_owned();
        let label = format!("t{}", random_hex(4));
        let token = testkit::token::Token::create(&d, &label);
        let module = token.module.clone();
        let conf_var = token.conf_var;
        let (token_conf, pin, pin_file) = (token.conf, token.pin, token.pin_file);
        let certs = opts.tls.then(|| Certs::generate(&d));
        let port = if opts.tls { free_port() } else { 0 };
        let socket = d.join("kms.sock");
        let store = d.join("store");
        let mut toml = String::new();
        if let Some(c) = &certs {
            toml.push_str(&format!(
                "[listen]\ntcp = \"127.0.0.1:{port}\"\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
                c.server_cert, c.server_key, c.ca
            ));
        } else {
            toml.push_str(&format!("[listen]\nunix = {socket:?}\n"));
            match &opts.allowed_uids {
                Some(u) => toml.push_str(&format!("allowed_uids = {u:?}\n")),
                // The tests run the KMS, its clients and its admin commands as one user.
                None => toml.push_str("single_user = true\n"),
            }
        }
        toml.push_str(&format!(
            "[hsm]\nmodule = {module:?}\ntoken_label = {label:?}\npin_file = {pin_file:?}\nkek_label = {KEK_LABEL:?}\nsessions = {}\ndek_residency = {:?}\n",
            opts.sessions.unwrap_or(2),
            // The residency the suites run in (scripts/test.sh runs them in both).
            std::env::var("PROGRESSDB_TEST_RESIDENCY").unwrap_or_else(|_| "memory".into()),
        ));
        toml.push_str(&format!("[store]\npath = {store:?}\nmap_size_mb = 16\n"));
        toml.push_str(&format!(
            "[cache]\nttl_secs = 60\nmax_entries = {}\n",
            opts.cache_max_entries.unwrap_or(1000)
        ));
        toml.push_str(&format!(
            "[limits]\nmax_body_bytes = {}\nread_timeout_secs = 10\nshutdown_timeout_secs = 10\n",
            opts.max_body_bytes.unwrap_or(1 << 20)
        ));
        let config = d.join("kms.toml");
        fs::write(&config, toml).unwrap();
        let kms = Kms {
            log: d.join("kms.log"),
            dir,
            token_conf,
            conf_var,
            config,
            pin,
            pin_file,
            socket,
            store,
            certs,
            port,
            opts,
            child: None,
        };
        if kms.opts.skip_init_kek {
            return kms;
        }
        let out = kms.command(&["init-kek"]).output().unwrap();
        assert!(
            out.status.success(),
            "init-kek failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        kms.append_log(&out.stdout);
        kms.append_log(&out.stderr);
        kms
    }

    /// Provisions and starts a KMS, waiting until `/readyz` answers 200.
    pub async fn start(opts: Options) -> Kms {
        let mut k = Kms::provision(opts);
        k.spawn();
        k.wait_ready().await;
        k
    }

    /// A `progressdb-kms` command with this KMS's config and environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env(self.conf_var, &self.token_conf)
            .env(
                "RUST_LOG",
                self.opts.rust_log.clone().unwrap_or_else(|| "info".into()),
            )
            .env_remove("PROGRESSDB_KMS_HSM_PIN");
        for (k, v) in &self.opts.env {
            c.env(k, v);
        }
        c
    }

    /// Rewrites the config file.
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let old = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, f(old)).unwrap();
    }

    /// Runs `serve` to completion (for start-up failures), with a deadline; returns the status
    /// and the combined output, which is also appended to the log.
    pub fn run_serve_expecting_exit(&self) -> (ExitStatus, String) {
        let mut child = self
            .command(&["serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        self.append_log(&out.stdout);
        self.append_log(&out.stderr);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    pub fn append_log(&self, bytes: &[u8]) {
        use std::io::Write as _;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    /// Starts `serve` (stdout and stderr appended to the log).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command(&["serve"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    pub fn endpoint(&self) -> Endpoint {
        if self.opts.tls {
            Endpoint::Https {
                host: "localhost".into(),
                port: self.port,
            }
        } else {
            Endpoint::Unix(self.socket.clone())
        }
    }

    /// A client with this KMS's default identity (the good client certificate under mTLS).
    pub fn client(&self) -> KmsClient {
        let tls = self
            .certs
            .as_ref()
            .map(|c| client_tls(c, Some((c.client_cert.as_path(), c.client_key.as_path()))));
        self.client_with(tls)
    }

    pub fn client_with(&self, tls: Option<Arc<rustls::ClientConfig>>) -> KmsClient {
        let mut cfg = KmsClientConfig::new(self.endpoint(), tls);
        cfg.max_retries = 0;
        cfg.max_idle = 64;
        cfg.request_timeout = Duration::from_secs(20);
        KmsClient::new(cfg).unwrap()
    }

    pub async fn wait_ready(&mut self) {
        self.wait_status(200).await;
    }

    /// Waits until `/readyz` answers `want`.
    pub async fn wait_status(&mut self, want: u16) {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "progressdb-kms exited early with {status}:\n{}",
                    self.log_text()
                );
            }
            if let Ok((s, _)) = client.raw(http::Method::GET, "/readyz", Vec::new()).await {
                if s == want {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "KMS not ready after 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the child to exit (at most `timeout`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self
                .child
                .as_mut()
                .expect("not running")
                .try_wait()
                .unwrap()
            {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "KMS did not exit within {timeout:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL (a crash): nothing is cleaned up, the socket file stays behind.
    pub fn crash(&mut self) {
        let mut c = self.child.take().expect("not running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM, then expects a clean exit 0.
    pub async fn stop(&mut self) {
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "KMS exited with {status}:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Stops the KMS if running and checks that the whole log holds none of `secrets` (nor
    /// the PIN) in any common encoding.
    pub async fn finish(mut self, secrets: &[&[u8]]) {
        if self.child.is_some() {
            self.stop().await;
        }
        let mut all: Vec<&[u8]> = secrets.to_vec();
        all.push(self.pin.as_bytes());
        testkit::assert_absent("KMS log", &fs::read(&self.log).unwrap_or_default(), &all);
    }

    /// The value of one metric line (`name{labels} value`) from `/metrics`.
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
}

impl Drop for Kms {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether the suites run in hsm residency (`PROGRESSDB_TEST_RESIDENCY=hsm`).
#[allow(dead_code)]
pub fn residency_is_hsm() -> bool {
    std::env::var("PROGRESSDB_TEST_RESIDENCY").as_deref() == Ok("hsm")
}
