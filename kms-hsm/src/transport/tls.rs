//! The TCP endpoint with mutual TLS: handshakes under the read timeout, peers identified by
//! their client certificate, admins by its subject (see the parent module's documentation).

use std::net::SocketAddr;
use std::sync::Arc;

use service_kit::conn::{ConnectionGate, PeerId};
use service_kit::serve::{self, GracefulShutdown};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Role, Routers, ServeOptions};
use crate::backend::KeyBackend;
use crate::http::{Peer, PeerRole};
use crate::keystore::KeyStore;

/// A TCP listener with its TLS acceptor.
pub struct TlsSocket {
    pub(super) listener: TcpListener,
    pub(super) acceptor: TlsAcceptor,
    pub(super) addr: SocketAddr,
    pub(super) admin_subjects: Arc<Vec<String>>,
}

impl std::fmt::Debug for TlsSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Accepts on the TLS listener `t` until `stop` turns true: a connection over the global cap
/// is closed before any handshake is spent on it; the handshake must finish within the read
/// timeout; the client certificate names the peer, its role and its per-peer cap.
pub(super) async fn accept_loop<B, S>(
    t: &TlsSocket,
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
    while let Some((tcp, peer)) = serve::next_connection(&mut stopped, || t.listener.accept()).await
    {
        // Over the global cap: closed before any TLS handshake is spent on it.
        let Ok(global) = gate.admit() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = t.acceptor.clone();
        let admin_subjects = Arc::clone(&t.admin_subjects);
        let gate = gate.clone();
        let routers = routers.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(opts.read_timeout, acceptor.accept(tcp)).await {
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
            let (role, peer_role) = if is_admin_certificate(&cert, &admin_subjects) {
                (Role::Admin, PeerRole::Admin)
            } else {
                (Role::Client, PeerRole::Client)
            };
            let d = ring::digest::digest(&ring::digest::SHA256, &cert);
            let mut id = [0u8; 32];
            id.copy_from_slice(d.as_ref());
            let peer = Peer::new(peer_role, &format!("cert:{}", hex::encode(&id[..8])));
            match gate.admit_peer(global, PeerId::Certificate(id)) {
                Ok(permit) => {
                    routers.serve(tls, role, peer, opts, watcher).await;
                    drop(permit);
                }
                Err(why) => gate.refuse(tls, why),
            }
        });
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
