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

mod tls;
mod unix;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kms_api::tls::TlsError;
use service_kit::conn::ConnectionGate;
use service_kit::serve::{self, GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

pub use self::tls::TlsSocket;
pub use self::unix::UnixSocket;
use crate::backend::KeyBackend;
use crate::config::ListenConfig;
use crate::http::{Api, Peer, PeerRole};
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
                let std_listener = unix::bind_unix(path, access.mode()).map_err(err)?;
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

impl EndpointKind {
    /// The role of the peers of this endpoint (whether allowed or not).
    fn peer_role(self) -> PeerRole {
        match self {
            EndpointKind::Client => PeerRole::Client,
            EndpointKind::Admin => PeerRole::Admin,
        }
    }
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
    serve::drain(graceful, opts.shutdown_timeout).await;
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
    stop: tokio::sync::watch::Receiver<bool>,
) where
    B: KeyBackend,
    S: KeyStore,
{
    match listener {
        Listener::Unix(u) => unix::accept_loop(u, kind, routers, opts, gate, graceful, stop).await,
        Listener::Tls(t) => tls::accept_loop(t, routers, opts, gate, graceful, stop).await,
    }
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

impl<B: KeyBackend, S: KeyStore> Routers<B, S> {
    /// Serves one admitted connection: the router of `role`, every request tagged with `peer`.
    async fn serve<I>(self, io: I, role: Role, peer: Peer, opts: ServeOptions, watcher: Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = match role {
            Role::Client => self.client,
            Role::Admin => self.admin,
            Role::Refused => self.forbidden,
        };
        let api = self.api;
        let answer = move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            let (api, router) = (Arc::clone(&api), router.clone());
            async move { crate::http::answer(&api, router, req).await }
        };
        let timeouts = serve::ConnTimeouts {
            header_read: opts.read_timeout,
            write: opts.write_timeout,
        };
        let keep_alive = if role == Role::Refused {
            serve::KeepAlive::Off
        } else {
            serve::KeepAlive::On
        };
        serve::serve_connection(io, answer, timeouts, keep_alive, watcher).await;
    }
}
