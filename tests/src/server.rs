//! The `progressdb` process harness of the end-to-end tests: a [`ServerBuilder`] writes the
//! server's config (a fresh set of API keys, the store, the KMS provider, limits) from typed
//! options and starts the binary ([`Server`]); [`Api`] is a small blocking client acting as one
//! role and user.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac as _};
use serde_json::Value;
use sha2::Sha256;

use crate::{bin, log_level, random_hex, write_secret, Kms, KmsListen, Proc};

/// Which provider the server uses.
#[derive(Clone, Debug)]
pub enum Provider {
    /// `kms.mode = "external"` against `endpoint`; TLS files (CA, client certificate, client
    /// key) when it is https.
    External {
        endpoint: String,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    },
    /// `kms.mode = "external"` over several replicas (`kms.endpoints`), Unix sockets.
    Replicas { endpoints: Vec<String> },
    /// `kms.mode = "embedded"` with a master key file (dev builds only).
    Embedded { master_key_file: PathBuf },
}

impl Provider {
    /// The external provider of a test KMS, with its client certificate under mutual TLS.
    pub fn of(kms: &Kms) -> Self {
        let tls = match (kms.listen, &kms.certs) {
            (KmsListen::Mtls, Some(c)) => {
                Some((c.ca.clone(), c.client_cert.clone(), c.client_key.clone()))
            }
            _ => None,
        };
        Provider::External {
            endpoint: kms.endpoint.clone(),
            tls,
        }
    }
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

/// Typed options of a test server. Defaults: the `progressdb` binary, encryption on, no
/// provider (set one with [`ServerBuilder::kms`] or [`ServerBuilder::provider`]), no limits,
/// a port the server binds itself.
#[derive(Debug)]
pub struct ServerBuilder {
    root: PathBuf,
    binary: String,
    provider: Option<Provider>,
    encryption: bool,
    port: u16,
    http: Vec<(&'static str, u64)>,
    kms_client: Vec<(&'static str, u64)>,
    limits: Vec<(&'static str, u64)>,
    extra: String,
    /// `store.url` of a PostgreSQL store; LMDB in `root/server/store` without it.
    postgres: Option<String>,
}

impl ServerBuilder {
    /// A server whose files go under `root/server/` (log: `root/server.log`).
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            binary: "progressdb".into(),
            provider: None,
            encryption: true,
            port: 0,
            http: Vec::new(),
            kms_client: Vec::new(),
            limits: Vec::new(),
            extra: String::new(),
            postgres: None,
        }
    }

    /// Keeps the messages in the PostgreSQL database `url` (`store.backend = "postgres"`).
    pub fn postgres_store(mut self, url: &str) -> Self {
        self.postgres = Some(url.to_owned());
        self
    }

    /// `progressdb` (default features) or `progressdb-dev` (with the embedded provider).
    pub fn binary(mut self, name: &str) -> Self {
        self.binary = name.into();
        self
    }

    /// The external provider of `kms` ([`Provider::of`]).
    pub fn kms(self, kms: &Kms) -> Self {
        self.provider(&Provider::of(kms))
    }

    pub fn provider(mut self, provider: &Provider) -> Self {
        self.provider = Some(provider.clone());
        self
    }

    /// `encryption.enabled` (default true).
    pub fn encryption(mut self, on: bool) -> Self {
        self.encryption = on;
        self
    }

    /// `http.listen`'s port (default 0: the server binds a free port and the harness reads it
    /// back; a fixed port only for a config that is checked, not served).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// One `[http]` key besides `listen` (e.g. `max_connections`, `write_timeout_secs`).
    pub fn http(mut self, key: &'static str, value: u64) -> Self {
        self.http.retain(|(k, _)| *k != key);
        self.http.push((key, value));
        self
    }

    /// One `[kms]` key of the KMS client besides the provider's (e.g. `deadline_ms`,
    /// `breaker_failures`).
    pub fn kms_client(mut self, key: &'static str, value: u64) -> Self {
        self.kms_client.retain(|(k, _)| *k != key);
        self.kms_client.push((key, value));
        self
    }

    /// One `[limits]` key (e.g. `key_rate_per_sec`).
    pub fn limit(mut self, key: &'static str, value: u64) -> Self {
        self.limits.retain(|(k, _)| *k != key);
        self.limits.push((key, value));
        self
    }

    /// Arbitrary TOML appended to the config: for a test of config parsing, or a section no
    /// typed option covers (it must not repeat a section the options write).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self
    }

    /// Writes the keys file and the config; starts nothing. The returned server's `base` is
    /// known once it is started.
    pub fn provision(self) -> Server {
        let provider = self
            .provider
            .clone()
            .expect("a test server needs a provider: ServerBuilder::kms or ::provider");
        let dir = self.root.join("server");
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
        let mut kms = match &provider {
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
        for (k, v) in &self.kms_client {
            writeln!(kms, "{k} = {v}").unwrap();
        }
        let mut http = String::new();
        for (k, v) in &self.http {
            writeln!(http, "{k} = {v}").unwrap();
        }
        let store_section = match &self.postgres {
            Some(url) => format!("backend = \"postgres\"\nurl = \"{url}\""),
            None => format!("path = \"{}\"", store.display()),
        };
        let mut text = format!(
            "[http]\nlisten = \"127.0.0.1:{}\"\n{http}\n[store]\n{store_section}\n\n[auth]\nkeys_file = \"{}\"\n\n[encryption]\nenabled = {}\n\n[kms]\n{kms}",
            self.port,
            keys_file.display(),
            self.encryption
        );
        if !self.limits.is_empty() {
            text.push_str("\n[limits]\n");
            for (k, v) in &self.limits {
                writeln!(text, "{k} = {v}").unwrap();
            }
        }
        text.push_str(&self.extra);
        let config = dir.join("server.toml");
        fs::write(&config, text).unwrap();
        Server {
            proc: Proc::none("progressdb", &self.root.join("server.log")),
            config,
            base: format!("http://127.0.0.1:{}", self.port),
            keys,
            store,
            root: self.root.clone(),
            binary: bin(&self.binary),
        }
    }

    /// [`ServerBuilder::provision`], then starts the server and waits for `/healthz`.
    pub fn start(self) -> Server {
        let mut s = self.provision();
        s.restart();
        s
    }
}

/// A running `progressdb`.
#[derive(Debug)]
pub struct Server {
    pub proc: Proc,
    pub config: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub keys: Keys,
    pub store: PathBuf,
    pub root: PathBuf,
    pub binary: PathBuf,
}

impl Server {
    /// Opens the (stopped) server's LMDB store in this process, applies `f` (with a runtime
    /// to run the store's calls on), closes it: for records planted or read behind the
    /// server's back.
    pub fn with_store(&self, f: impl FnOnce(&progressdb::store::Store, &tokio::runtime::Runtime)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = progressdb::store::Store::open(
            &progressdb::store::StoreOptions::new(&self.store, 64, 1024),
            progressdb::metrics::StoreMetrics::default(),
        )
        .unwrap();
        f(&store, &rt);
        drop(store);
    }

    /// Rewrites the config file (stop or restart the server to apply it).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let old = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, f(old)).unwrap();
    }

    /// (Re)starts the server, stopping it first if it runs, and waits for `/healthz`. Started
    /// for the first time on port 0, it binds a free port, which is read back and written
    /// into the config (a restart keeps it).
    pub fn restart(&mut self) {
        self.proc.stop_if_running();
        let mut cmd = Command::new(&self.binary);
        cmd.env("RUST_LOG", log_level())
            .arg("serve")
            .arg("--config")
            .arg(&self.config);
        self.proc = Proc::spawn("progressdb", cmd, &self.proc.log.clone());
        if self.base.ends_with(":0") {
            let port = self.proc.wait_tcp_port();
            self.edit_config(|t| {
                t.replacen(
                    "listen = \"127.0.0.1:0\"",
                    &format!("listen = \"127.0.0.1:{port}\""),
                    1,
                )
            });
            self.base = format!("http://127.0.0.1:{port}");
        }
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
            std::thread::sleep(Duration::from_millis(20));
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

    /// The status of `GET /healthz` (panics on a transport failure).
    pub fn healthz(&self) -> u16 {
        match ureq::get(&format!("{}/healthz", self.base)).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("GET /healthz: {e}"),
        }
    }

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

/// The role a test client acts in.
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
