//! Shared helpers of the integration tests: a temp directory with secret files and a config,
//! an in-process server on a real TCP socket, the spawned binary, and a small HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::Sha256;

pub(crate) const ADMIN: &str = "admin-key-0123456789";
pub(crate) const BACKEND: &str = "backend-key-0123456789";
pub(crate) const FRONTEND: &str = "frontend-key-0123456789";
pub(crate) const SIGNING_SECRET: &str = "signing-secret-for-tests";
pub(crate) const MASTER_KEY_HEX: &str =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// How the server gets its keys.
#[derive(Debug, Clone)]
pub(crate) enum Kms {
    Embedded,
    /// `kms.endpoint`, plus whether to configure the dev master key for the fallback.
    External {
        endpoint: String,
        master_key: bool,
    },
    /// `encryption.enabled = false`, no provider.
    Plain,
}

/// A temp dir holding `keys.toml`, `master.key` (both 0600), the store and a config.
pub(crate) struct TestEnv {
    pub dir: tempfile::TempDir,
}

fn write_secret(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Rewrites `dir/keys.toml` with the test keys and `secrets` (TOML lines naming the signing
/// secret or secrets).
pub(crate) fn write_keys(dir: &Path, secrets: &str) {
    write_secret(
        &dir.join("keys.toml"),
        &format!(
            "admin = [\"{ADMIN}\"]\nbackend = [\"{BACKEND}\"]\nfrontend = [\"{FRONTEND}\"]\n{secrets}"
        ),
    );
}

impl TestEnv {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_secret(
            &dir.path().join("keys.toml"),
            &format!(
                "admin = [\"{ADMIN}\"]\nbackend = [\"{BACKEND}\"]\nfrontend = [\"{FRONTEND}\"]\nsigning_secret = \"{SIGNING_SECRET}\"\n"
            ),
        );
        write_secret(&dir.path().join("master.key"), MASTER_KEY_HEX);
        Self { dir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Writes `progressdb.toml` for `kms`, with `extra` TOML appended (may add sections).
    pub(crate) fn config(&self, kms: &Kms, extra: &str) -> PathBuf {
        self.config_with_store(kms, "", extra)
    }

    /// Like [`Self::config`], with `store_extra` lines added to `[store]`.
    pub(crate) fn config_with_store(&self, kms: &Kms, store_extra: &str, extra: &str) -> PathBuf {
        let d = self.dir.path();
        let kms_section = match kms {
            Kms::Embedded => format!(
                "[encryption]\nenabled = true\n[kms]\nmode = \"embedded\"\nmaster_key_file = \"{}\"\n",
                d.join("master.key").display()
            ),
            Kms::External { endpoint, master_key } => {
                let mk = if *master_key {
                    format!("master_key_file = \"{}\"\n", d.join("master.key").display())
                } else {
                    String::new()
                };
                format!(
                    "[encryption]\nenabled = true\n[kms]\nmode = \"external\"\nendpoint = \"{endpoint}\"\nrequest_timeout_ms = 1000\nconnect_timeout_ms = 500\nmax_retries = 1\n{mk}"
                )
            }
            Kms::Plain => "[encryption]\nenabled = false\n".to_owned(),
        };
        let body = format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 5\nmetrics_access = \"admin\"\n[store]\npath = \"{}\"\n{store_extra}\n[auth]\nkeys_file = \"{}\"\n{kms_section}\n[log]\nlevel = \"warn\"\n{extra}\n",
            self.store_path().display(),
            d.join("keys.toml").display(),
        );
        let p = d.join("progressdb.toml");
        std::fs::write(&p, body).unwrap();
        p
    }
}

/// A server running inside the test's tokio runtime.
pub(crate) struct InProc {
    pub addr: SocketAddr,
    pub app: std::sync::Arc<progressdb::service::MessageService>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProc {
    pub(crate) async fn start(config: &Path) -> Self {
        Self::try_start(config).await.unwrap()
    }

    pub(crate) async fn try_start(config: &Path) -> Result<Self, progressdb::BuildError> {
        Self::try_start_with_env(config, &[]).await
    }

    /// Starts with `PROGRESSDB__*` overrides given as (name, value) pairs.
    pub(crate) async fn try_start_with_env(
        config: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self, progressdb::BuildError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let cfg = progressdb::Config::load_with_env(config, Some(env))?;
        let server = progressdb::Server::build(&cfg).await?;
        let app = server.service().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Ok(Self {
            addr,
            app,
            shutdown: Some(tx),
            task,
        })
    }

    /// Graceful stop; waits until the store is closed.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let InProc { app, task, .. } = self;
        task.await.unwrap();
        // The last handle to the app closes the store (joins the writer thread).
        tokio::task::spawn_blocking(move || drop(app))
            .await
            .unwrap();
    }
}

/// The `progressdb` binary as a child process.
pub(crate) struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

impl Proc {
    /// Spawns `progressdb serve --config <config>` and waits for "listening on <addr>".
    // The child is handed to `Proc`, whose `Drop` kills and waits for it; a panic before that
    // fails the test anyway.
    #[allow(clippy::zombie_processes)]
    pub(crate) fn spawn(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_progressdb"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("server did not log 'listening on'");
            if let Some(i) = line.find("listening on ") {
                let addr = line[i + "listening on ".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                return Self {
                    child,
                    addr,
                    stderr: rx,
                };
            }
        }
    }

    pub(crate) fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: kill(2) takes two integers and touches no memory of this process.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(r, 0);
    }

    /// Waits for exit (up to `secs`), returning the status code.
    pub(crate) fn wait(&mut self, secs: u64) -> Option<i32> {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(std::time::Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far.
    pub(crate) fn drain_log(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Who calls.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub key: String,
    pub user: Option<String>,
    pub sig: Option<String>,
}

pub(crate) fn sign(user: &str) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).unwrap();
    m.update(user.as_bytes());
    hex::encode(m.finalize().into_bytes())
}

impl Caller {
    pub(crate) fn admin() -> Self {
        Self {
            key: ADMIN.into(),
            user: None,
            sig: None,
        }
    }
    pub(crate) fn backend() -> Self {
        Self {
            key: BACKEND.into(),
            user: None,
            sig: None,
        }
    }
    pub(crate) fn backend_as(user: &str) -> Self {
        Self {
            key: BACKEND.into(),
            user: Some(user.into()),
            sig: None,
        }
    }
    pub(crate) fn admin_as(user: &str) -> Self {
        Self {
            key: ADMIN.into(),
            user: Some(user.into()),
            sig: None,
        }
    }
    /// A frontend caller with a correct signature.
    pub(crate) fn frontend(user: &str) -> Self {
        Self {
            key: FRONTEND.into(),
            user: Some(user.into()),
            sig: Some(sign(user)),
        }
    }
    pub(crate) fn anonymous() -> Self {
        Self {
            key: String::new(),
            user: None,
            sig: None,
        }
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if !self.key.is_empty() {
            h.push(("authorization", format!("Bearer {}", self.key)));
        }
        if let Some(u) = &self.user {
            h.push(("x-user-id", u.clone()));
        }
        if let Some(s) = &self.sig {
            h.push(("x-user-signature", s.clone()));
        }
        h
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub(crate) struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub(crate) fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// Sends one request on a fresh connection.
pub(crate) async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> Resp {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let has_body = body.is_some();
    if has_body {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

/// A client bound to a server address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client {
    pub addr: SocketAddr,
}

impl Client {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    pub(crate) async fn call(
        &self,
        who: &Caller,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let h = who.headers();
        raw(
            self.addr,
            method,
            path,
            &h,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
        )
        .await
    }

    pub(crate) async fn get(&self, who: &Caller, path: &str) -> Resp {
        self.call(who, "GET", path, None).await
    }

    pub(crate) async fn post(&self, who: &Caller, path: &str, body: Value) -> Resp {
        self.call(who, "POST", path, Some(body)).await
    }

    /// Creates a thread and returns its id (asserts 201).
    pub(crate) async fn create_thread(&self, who: &Caller, title: &str) -> String {
        let r = self
            .post(who, "/v1/threads", serde_json::json!({"title": title}))
            .await;
        assert_eq!(r.status, 201, "{:?}", r.json());
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// Posts a message and returns its id (asserts 201).
    pub(crate) async fn post_message(&self, who: &Caller, thread: &str, body: Value) -> String {
        let r = self
            .post(
                who,
                &format!("/v1/threads/{thread}/messages"),
                serde_json::json!({"body": body}),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.json());
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// Every message of a thread, following cursors.
    pub(crate) async fn all_messages(
        &self,
        who: &Caller,
        thread: &str,
        order: &str,
        limit: usize,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/threads/{thread}/messages?order={order}&limit={limit}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let r = self.get(who, &path).await;
            assert_eq!(r.status, 200, "{:?}", r.json());
            let j = r.json();
            out.extend(j["messages"].as_array().unwrap().iter().cloned());
            match j["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }
}

/// Whether `needle` occurs anywhere in the files under `dir`.
pub(crate) fn dir_contains(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let p = e.unwrap().path();
        p.is_file()
            && std::fs::read(&p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
    })
}
