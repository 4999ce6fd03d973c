//! Listeners and the connection loop.
//!
//! * **Unix socket** (`listen.unix`): created with mode 0600 without a window in which it is
//!   reachable with looser permissions (bound inside a fresh 0700 directory, chmod-ed, then
//!   renamed into place). A stale socket left by a crashed KMS is replaced; a live one (another
//!   process answers on it) or a path that is not a socket is refused. Optional allow-list of
//!   peer uids checked with `SO_PEERCRED`: other peers get `403 forbidden` and the connection is
//!   closed. The socket file is removed on shutdown if it is still ours.
//! * **TCP with mutual TLS** (`listen.tcp`): rustls via [`kms_api::tls::server_config`]; a
//!   client without a certificate issued by `tls.client_ca` fails the handshake. There is no
//!   plain-TCP mode.
//! * **Limits** ([`service_kit::conn`]): every connection is accepted at once, then admitted
//!   under `limits.max_connections` (all peers) and `limits.max_connections_per_peer` (one
//!   uid on the Unix socket, one client certificate on TCP); one over a cap gets an immediate
//!   `503 overloaded` with `Retry-After` (on TCP, a connection over the global cap is closed
//!   before any TLS handshake is spent on it). The request head must arrive within
//!   `limits.read_timeout_secs` (hyper `header_read_timeout`, which also closes keep-alive
//!   connections idle that long) and so must the TLS handshake; bodies have their own
//!   deadline in [`crate::http`].
//! * **Admin socket** (`listen.admin_unix`, see [`crate::config::AdminConfig`]): a second
//!   Unix socket, bound the same way, whose peers must be in `listen.admin_uids`; it serves
//!   only the admin API ([`crate::http::admin`]). On TCP, a client whose certificate subject
//!   is in `tls.admin_subjects` gets the admin API instead of the key API. The key API
//!   answers `/admin/...` with 403 whoever asks.
//! * **Graceful shutdown**: when the shutdown future completes the loop stops accepting,
//!   removes the socket file, lets every open connection finish its in-flight request (idle
//!   keep-alive connections are closed) and returns, or gives up after
//!   `limits.shutdown_timeout_secs`.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use kms_api::tls::TlsError;
use service_kit::conn::{ConnectionGate, PeerId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

use crate::backend::KeyBackend;
use crate::config::ListenConfig;
use crate::http::Api;
use crate::keystore::KeyStore;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("listen.unix {path}: {detail}")]
    Unix { path: PathBuf, detail: String },
    #[error("listen.tcp {addr}: {detail}")]
    Tcp { addr: SocketAddr, detail: String },
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
}

/// Timeouts and limits of the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Deadline for a request head (and for a TLS handshake); also the idle timeout.
    pub read_timeout: Duration,
    /// A write that makes no progress this long ends the connection.
    pub write_timeout: Duration,
    /// How long in-flight requests may run after shutdown starts.
    pub shutdown_timeout: Duration,
}

/// A bound Unix socket that removes its file when dropped (if the file is still ours).
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    ident: (u64, u64),
    allowed_uids: Option<HashSet<u32>>,
    /// Uids refused on the client socket whatever the allow-list says: the admins, unless
    /// `listen.single_user` ([`Listener::refusing_admins`]).
    admin_uids: HashSet<u32>,
}

impl std::fmt::Debug for UnixSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixSocket")
            .field("path", &self.path)
            .field("allowed_uids", &self.allowed_uids)
            .finish()
    }
}

impl UnixSocket {
    fn remove_file(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.ident => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove socket file");
                }
            }
            _ => {}
        }
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        self.remove_file();
    }
}

/// A TCP listener with its TLS acceptor.
pub struct TlsSocket {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
    admin_subjects: Arc<Vec<String>>,
}

impl std::fmt::Debug for TlsSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Where connections come from.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixSocket),
    Tls(TlsSocket),
}

impl Listener {
    /// Binds the configured transport. Must run inside a Tokio runtime.
    ///
    /// # Errors
    /// [`TransportError`] naming the key or file at fault.
    pub fn bind(cfg: &ListenConfig) -> Result<Self, TransportError> {
        match cfg {
            ListenConfig::Unix {
                path,
                access,
                allowed_uids,
            } => {
                let err = |detail: String| TransportError::Unix {
                    path: path.clone(),
                    detail,
                };
                let std_listener = bind_unix(path, access.mode()).map_err(err)?;
                let ident = std::fs::symlink_metadata(path)
                    .map(|m| (m.dev(), m.ino()))
                    .map_err(|e| err(e.to_string()))?;
                std_listener
                    .set_nonblocking(true)
                    .map_err(|e| err(e.to_string()))?;
                let listener =
                    UnixListener::from_std(std_listener).map_err(|e| err(e.to_string()))?;
                Ok(Listener::Unix(UnixSocket {
                    listener,
                    path: path.clone(),
                    ident,
                    allowed_uids: allowed_uids.as_ref().map(|v| v.iter().copied().collect()),
                    admin_uids: HashSet::new(),
                }))
            }
            ListenConfig::Tcp { addr, tls } => {
                let server = kms_api::tls::server_config(&tls.cert, &tls.key, &tls.client_ca)?;
                let err = |detail: String| TransportError::Tcp {
                    addr: *addr,
                    detail,
                };
                let std_listener =
                    std::net::TcpListener::bind(addr).map_err(|e| err(e.to_string()))?;
                let local = std_listener.local_addr().map_err(|e| err(e.to_string()))?;
                std_listener
                    .set_nonblocking(true)
                    .map_err(|e| err(e.to_string()))?;
                let listener =
                    TcpListener::from_std(std_listener).map_err(|e| err(e.to_string()))?;
                Ok(Listener::Tls(TlsSocket {
                    listener,
                    acceptor: TlsAcceptor::from(Arc::new(server)),
                    addr: local,
                    admin_subjects: Arc::new(tls.admin_subjects.clone()),
                }))
            }
        }
    }

    /// Binds the admin socket (mode 0600, peers restricted to `listen.admin_uids`). Must run
    /// inside a Tokio runtime.
    ///
    /// # Errors
    /// [`TransportError`] naming the socket path.
    pub fn bind_admin(cfg: &crate::config::AdminConfig) -> Result<Self, TransportError> {
        Self::bind(&ListenConfig::Unix {
            path: cfg.unix.clone(),
            access: crate::config::SocketAccess::Owner,
            allowed_uids: Some(cfg.uids.clone()),
        })
        .map_err(|e| match e {
            TransportError::Unix { path, detail } => TransportError::Unix {
                path,
                detail: format!("(admin socket, listen.admin_unix) {detail}"),
            },
            other => other,
        })
    }

    /// The client listener, refusing every peer whose uid is an admin's (`listen.admin_uids`)
    /// unless `listen.single_user`: the server's identity never reaches the admin API, even
    /// through a uid the allow-list admits by mistake.
    #[must_use]
    pub fn refusing_admins(mut self, admin: &crate::config::AdminConfig) -> Self {
        if let (Listener::Unix(u), crate::config::Users::Separate) = (&mut self, admin.users) {
            u.admin_uids = admin.uids.iter().copied().collect();
        }
        self
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(u) => format!("unix://{}", u.path.display()),
            Listener::Tls(t) => format!("https://{} (mutual TLS)", t.addr),
        }
    }
}

/// Binds a Unix socket at `path` with `mode` (0600 or 0660), replacing a stale socket file.
fn bind_unix(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener, String> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(format!("directory {} does not exist", parent.display()));
    }
    if let Some(why) = service_kit::check::unsafe_socket_dir(parent) {
        return Err(format!(
            "{why}; use a directory only the KMS's user and group can write (e.g. /run/progressdb-kms, mode 0750)"
        ));
    }
    match std::fs::symlink_metadata(path) {
        // Only a socket nobody listens on (ECONNREFUSED) is stale; anything else (a live
        // listener, a socket we may not connect to) is left alone.
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err("another process is listening on this socket".into()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing stale socket file");
            }
            Err(e) => return Err(format!("existing socket cannot be checked: {e}")),
        },
        Ok(_) => return Err("exists and is not a socket; refusing to replace it".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    // Bind inside a private directory, restrict the socket, then move it into place: no one
    // can connect before the mode is set (connecting needs search permission on the
    // directory), and rename() atomically replaces a stale socket.
    let tmp_dir = parent.join(format!(".kms{:08x}", rand::random::<u32>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .map_err(|e| format!("cannot create {}: {e}", tmp_dir.display()))?;
    let tmp_sock = tmp_dir.join("s");
    let result = (|| {
        let l = std::os::unix::net::UnixListener::bind(&tmp_sock).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&tmp_sock, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp_sock, path).map_err(|e| e.to_string())?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp_sock);
    let _ = std::fs::remove_dir(&tmp_dir);
    result
}

/// What a connection is served: the key API, the admin API, or only 403s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Client,
    Admin,
    Refused,
}

/// Which endpoint a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndpointKind {
    Client,
    Admin,
}

/// Accepts and serves connections on the client `listener` and the `admin` socket until
/// `shutdown` completes, then drains them.
///
/// # Errors
/// Never at present (accept errors are logged and retried); kept fallible for future
/// transports.
pub async fn serve<B, S>(
    listener: Listener,
    admin: Option<Listener>,
    api: Arc<Api<B, S>>,
    opts: ServeOptions,
    gate: Arc<ConnectionGate>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError>
where
    B: KeyBackend,
    S: KeyStore,
{
    let graceful = GracefulShutdown::new();
    let routers = Routers {
        client: crate::http::router(api.clone()),
        admin: crate::http::admin::router(api.clone()),
        forbidden: crate::http::forbidden_router(api.clone()),
        api,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tracing::info!(listen = %listener.describe(), "serving");
    if let Some(a) = &admin {
        tracing::info!(listen = %a.describe(), "serving the admin API");
    }
    let client_loop = accept_loop(
        &listener,
        EndpointKind::Client,
        &routers,
        opts,
        &gate,
        &graceful,
        stop_rx.clone(),
    );
    let admin_loop = async {
        if let Some(a) = &admin {
            accept_loop(
                a,
                EndpointKind::Admin,
                &routers,
                opts,
                &gate,
                &graceful,
                stop_rx.clone(),
            )
            .await;
        }
    };
    let stop = async {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tokio::join!(client_loop, admin_loop, stop);

    // Stop accepting: close the listeners (and remove the socket files) first.
    drop(listener);
    drop(admin);
    tracing::info!(
        connections = graceful.count(),
        "shutting down: finishing in-flight requests"
    );
    if tokio::time::timeout(opts.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_secs = opts.shutdown_timeout.as_secs(),
            "in-flight requests did not finish in time; closing them"
        );
    }
    Ok(())
}

/// Accepts on one listener until `stop` turns true.
async fn accept_loop<B, S>(
    listener: &Listener,
    kind: EndpointKind,
    routers: &Routers<B, S>,
    opts: ServeOptions,
    gate: &Arc<ConnectionGate>,
    graceful: &GracefulShutdown,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    B: KeyBackend,
    S: KeyStore,
{
    loop {
        let watcher = graceful.watcher();
        let routers = routers.clone();
        match listener {
            Listener::Unix(u) => {
                let accepted = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    a = u.listener.accept() => a,
                };
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        accept_backoff(&e).await;
                        continue;
                    }
                };
                let global = match gate.admit() {
                    Ok(p) => p,
                    Err(why) => {
                        gate.refuse(stream, why);
                        continue;
                    }
                };
                let (role, permit) = match stream.peer_cred() {
                    Ok(cred) => {
                        let uid = cred.uid();
                        let allowed = match &u.allowed_uids {
                            None => true,
                            Some(set) => set.contains(&uid),
                        };
                        let admin_as_client =
                            kind == EndpointKind::Client && u.admin_uids.contains(&uid);
                        let role = match (allowed, kind) {
                            _ if admin_as_client => {
                                tracing::warn!(uid, "refusing a client peer whose uid is an admin (listen.admin_uids); listen.single_user = true allows it for single-user development");
                                Role::Refused
                            }
                            (false, EndpointKind::Client) => {
                                tracing::warn!(uid, "refusing a peer not in listen.allowed_uids");
                                Role::Refused
                            }
                            (false, EndpointKind::Admin) => {
                                tracing::warn!(uid, "refusing an admin connection from a uid not in listen.admin_uids");
                                Role::Refused
                            }
                            (true, EndpointKind::Client) => Role::Client,
                            (true, EndpointKind::Admin) => Role::Admin,
                        };
                        (role, gate.admit_peer(global, PeerId::Uid(uid)))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read peer credentials; refusing");
                        (Role::Refused, Ok(ConnectionGate::without_peer(global)))
                    }
                };
                let permit = match permit {
                    Ok(p) => p,
                    Err(why) => {
                        gate.refuse(stream, why);
                        continue;
                    }
                };
                let peer = match (stream.peer_cred(), kind) {
                    (Ok(c), EndpointKind::Client) => format!("uid:{}", c.uid()),
                    (Ok(c), EndpointKind::Admin) => format!("admin:uid:{}", c.uid()),
                    (Err(_), _) => "uid:unknown".to_owned(),
                };
                if role == Role::Refused && kind == EndpointKind::Admin {
                    let api = Arc::clone(&routers.api);
                    tokio::spawn(crate::audit::ACTOR.scope(
                        std::sync::Arc::from(peer.as_str()),
                        async move {
                            api.audit_refusal("/admin", "uid not in listen.admin_uids")
                                .await;
                        },
                    ));
                }
                tokio::spawn(async move {
                    serve_connection(stream, routers, role, peer, opts, watcher).await;
                    drop(permit);
                });
            }
            Listener::Tls(t) => {
                let accepted = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    a = t.listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        accept_backoff(&e).await;
                        continue;
                    }
                };
                // Over the global cap: closed before any TLS handshake is spent on it.
                let Ok(global) = gate.admit() else {
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = t.acceptor.clone();
                let admin_subjects = Arc::clone(&t.admin_subjects);
                let gate = gate.clone();
                tokio::spawn(async move {
                    let tls =
                        match tokio::time::timeout(opts.read_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::info!(peer = %peer, error = %e, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(peer = %peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    // The verifier demands a client certificate, so there is one.
                    let cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.as_ref().to_vec());
                    let Some(cert) = cert else {
                        return;
                    };
                    let role = if is_admin_certificate(&cert, &admin_subjects) {
                        Role::Admin
                    } else {
                        Role::Client
                    };
                    let d = ring::digest::digest(&ring::digest::SHA256, &cert);
                    let mut id = [0u8; 32];
                    id.copy_from_slice(d.as_ref());
                    let peer = format!(
                        "{}cert:{}",
                        if role == Role::Admin { "admin:" } else { "" },
                        hex::encode(&id[..8])
                    );
                    match gate.admit_peer(global, PeerId::Certificate(id)) {
                        Ok(permit) => {
                            serve_connection(tls, routers, role, peer, opts, watcher).await;
                            drop(permit);
                        }
                        Err(why) => gate.refuse(tls, why),
                    }
                });
            }
        }
    }
}

/// Whether the (chain-verified) client certificate `der` names an admin: its subject common
/// name or one of its DNS subject-alternative names is in `tls.admin_subjects`. A
/// certificate that cannot be parsed is not an admin.
fn is_admin_certificate(der: &[u8], admin_subjects: &[String]) -> bool {
    if admin_subjects.is_empty() {
        return false;
    }
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let listed = |name: &str| admin_subjects.iter().any(|s| s == name);
    let cn = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .any(listed);
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|ext| {
            ext.value.general_names.iter().any(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => listed(d),
                _ => false,
            })
        });
    cn || san
}

async fn accept_backoff(e: &io::Error) {
    // EMFILE/ENFILE and friends: back off instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The routers, built once: the key API, the admin API, and the 403 answer for peers not
/// allowed.
struct Routers<B, S> {
    api: Arc<Api<B, S>>,
    client: axum::Router,
    admin: axum::Router,
    forbidden: axum::Router,
}

impl<B, S> Clone for Routers<B, S> {
    fn clone(&self) -> Self {
        Self {
            api: Arc::clone(&self.api),
            client: self.client.clone(),
            admin: self.admin.clone(),
            forbidden: self.forbidden.clone(),
        }
    }
}

async fn serve_connection<I, B, S>(
    io: I,
    routers: Routers<B, S>,
    role: Role,
    peer: String,
    opts: ServeOptions,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: KeyBackend,
    S: KeyStore,
{
    let router = match role {
        Role::Client => routers.client,
        Role::Admin => routers.admin,
        Role::Refused => routers.forbidden,
    };
    let api = routers.api;
    let peer = crate::http::Peer(std::sync::Arc::from(peer));
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let (api, router) = (Arc::clone(&api), router.clone());
        async move { Ok::<_, std::convert::Infallible>(crate::http::answer(&api, router, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.read_timeout)
        .keep_alive(role != Role::Refused);
    let conn = builder.serve_connection(
        TokioIo::new(service_kit::guarded_io::GuardedIo::new(
            io,
            opts.write_timeout,
        )),
        svc,
    );
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection closed with an error");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_mode_stale_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        // A directory every user can write is refused, naming it.
        let other = tempfile::tempdir().unwrap();
        let open = other.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = Listener::bind(&ListenConfig::Unix {
            path: open.join("kms.sock"),
            access: crate::config::SocketAccess::Owner,
            allowed_uids: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("writable by every user"), "{e}");
        assert!(!open.join("kms.sock").exists());
        let path = dir.path().join("kms.sock");
        // A stale socket (bound then closed) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let cfg = ListenConfig::Unix {
            path: path.clone(),
            access: crate::config::SocketAccess::Owner,
            allowed_uids: None,
        };
        // `socket_access = "group"`: 0660 (the peer check still applies).
        let group = ListenConfig::Unix {
            path: path.clone(),
            access: crate::config::SocketAccess::Group,
            allowed_uids: Some(vec![1]),
        };
        let l = Listener::bind(&group).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(l);
        let l = Listener::bind(&cfg).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live socket is refused.
        let e = Listener::bind(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("listen.unix") && e.contains("another process"),
            "{e}"
        );
        drop(l);
        assert!(!path.exists(), "socket removed on drop");
        // No temporary directories left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A regular file is not replaced.
        std::fs::write(&path, "x").unwrap();
        let e = Listener::bind(&cfg).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(path.exists());
    }
}
