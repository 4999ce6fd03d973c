//! The Unix-socket endpoint: binding with mode 0600/0660 and no window of looser
//! permissions, stale-socket replacement, peers identified by uid, and removal of the socket
//! file when the listener is dropped (see the parent module's documentation).

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use service_kit::conn::{ConnectionGate, PeerId};
use service_kit::serve::{self, GracefulShutdown};
use tokio::net::UnixListener;

use super::{EndpointKind, Role, Routers, ServeOptions};
use crate::backend::KeyBackend;
use crate::http::Peer;
use crate::keystore::KeyStore;

/// A bound Unix socket that removes its file when dropped (if the file is still ours).
pub struct UnixSocket {
    pub(super) listener: UnixListener,
    pub(super) path: PathBuf,
    /// (device, inode) of the socket file we created.
    pub(super) ident: (u64, u64),
    pub(super) allowed_uids: Option<HashSet<u32>>,
    /// Uids refused on the client socket whatever the allow-list says: the admins, unless
    /// `listen.single_user` ([`Listener::refusing_admins`]).
    pub(super) admin_uids: HashSet<u32>,
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

/// Binds a Unix socket at `path` with `mode` (0600 or 0660), replacing a stale socket file.
pub(super) fn bind_unix(
    path: &Path,
    mode: u32,
) -> Result<std::os::unix::net::UnixListener, String> {
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

/// Accepts on the Unix socket `u` (an endpoint of `kind`) until `stop` turns true: every
/// peer is admitted under the global cap, identified by its uid (`SO_PEERCRED`), given its
/// role and admitted under the per-peer cap.
pub(super) async fn accept_loop<B, S>(
    u: &UnixSocket,
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
    let stopped = stop.wait_for(|s| *s);
    tokio::pin!(stopped);
    while let Some((stream, _)) = serve::next_connection(&mut stopped, || u.listener.accept()).await
    {
        let global = match gate.admit() {
            Ok(p) => p,
            Err(why) => {
                gate.refuse(stream, why);
                continue;
            }
        };
        let cred = stream.peer_cred();
        let (role, permit) = match &cred {
            Ok(cred) => {
                let uid = cred.uid();
                (
                    u.role_of(uid, kind),
                    gate.admit_peer(global, PeerId::Uid(uid)),
                )
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
        let id = match &cred {
            Ok(c) => format!("uid:{}", c.uid()),
            Err(_) => "uid:unknown".to_owned(),
        };
        let peer = Peer::new(kind.peer_role(), &id);
        if role == Role::Refused && kind == EndpointKind::Admin {
            let api = Arc::clone(&routers.api);
            tokio::spawn(crate::audit::ACTOR.scope(peer.actor().clone(), async move {
                api.audit_refusal("/admin", "uid not in listen.admin_uids")
                    .await;
            }));
        }
        let routers = routers.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            routers.serve(stream, role, peer, opts, watcher).await;
            drop(permit);
        });
    }
}

impl UnixSocket {
    /// What a peer with `uid` is served on this socket, an endpoint of `kind`; refusals are
    /// logged.
    fn role_of(&self, uid: u32, kind: EndpointKind) -> Role {
        let allowed = self
            .allowed_uids
            .as_ref()
            .is_none_or(|set| set.contains(&uid));
        if kind == EndpointKind::Client && self.admin_uids.contains(&uid) {
            tracing::warn!(uid, "refusing a client peer whose uid is an admin (listen.admin_uids); listen.single_user = true allows it for single-user development");
            return Role::Refused;
        }
        match (allowed, kind) {
            (false, EndpointKind::Client) => {
                tracing::warn!(uid, "refusing a peer not in listen.allowed_uids");
                Role::Refused
            }
            (false, EndpointKind::Admin) => {
                tracing::warn!(
                    uid,
                    "refusing an admin connection from a uid not in listen.admin_uids"
                );
                Role::Refused
            }
            (true, EndpointKind::Client) => Role::Client,
            (true, EndpointKind::Admin) => Role::Admin,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::Listener;
    use super::*;
    use crate::config::ListenConfig;

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
