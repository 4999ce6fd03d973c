//! Connection admission: a listener that refuses to be exhausted.
//!
//! Both services accept every connection as soon as the kernel hands it over (the accept loop
//! never waits for a free slot, so the kernel backlog never silently fills up) and then ask
//! the [`ConnectionGate`]:
//! * at most `max_connections` connections are served at once (handshakes in progress
//!   included);
//! * at most `max_per_peer` of them come from one peer: a Unix-socket peer uid, a client
//!   certificate (by SHA-256 of its DER) or an IP address;
//! * a connection over either cap is answered at once with a canned
//!   `503 {"error":{"code":"overloaded",...}}` carrying `Retry-After` and closed
//!   ([`refuse`]), instead of stalling.
//!
//! Together with the header read timeout of the HTTP layer (which also bounds how long a
//! keep-alive connection may sit idle), a flood of slow or idle connections costs each
//! service at most `max_connections` sockets for at most that timeout, and probes from other
//! peers keep being answered.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps of a [`ConnectionGate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once, from everyone.
    pub max_connections: usize,
    /// Connections served at once from one peer.
    pub max_per_peer: usize,
}

/// Who is at the other end of a connection, for the per-peer cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerId {
    /// A Unix-socket peer, by uid (`SO_PEERCRED`).
    Uid(u32),
    /// A mutual-TLS peer, by the SHA-256 of its certificate's DER.
    Certificate([u8; 32]),
    /// A plain TCP peer, by address.
    Ip(IpAddr),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` are open.
    Global,
    /// `max_per_peer` are open from this peer.
    Peer,
}

/// Counters of a gate, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateStats {
    pub open: usize,
    pub refused_global: u64,
    pub refused_peer: u64,
}

/// See the module docs. Shared by the accept loop and every connection task.
#[derive(Debug)]
pub struct ConnectionGate {
    limits: ConnectionLimits,
    global: Arc<Semaphore>,
    /// Refusals being answered; past [`MAX_REFUSING`] a refused socket is closed at once.
    refusing: Arc<Semaphore>,
    peers: Mutex<HashMap<PeerId, usize>>,
    refused_global: AtomicU64,
    refused_peer: AtomicU64,
}

/// A connection's place under the global cap.
#[derive(Debug)]
pub struct GlobalPermit {
    _permit: OwnedSemaphorePermit,
}

/// A connection's place under both caps; released on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    _global: GlobalPermit,
    peer: Option<(Arc<ConnectionGate>, PeerId)>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some((gate, peer)) = self.peer.take() {
            let mut peers = gate.peers.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = peers.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    peers.remove(&peer);
                }
            }
        }
    }
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            limits: ConnectionLimits {
                max_connections: max,
                max_per_peer: limits.max_per_peer.max(1),
            },
            global: Arc::new(Semaphore::new(max)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            peers: Mutex::new(HashMap::new()),
            refused_global: AtomicU64::new(0),
            refused_peer: AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// A place under the global cap, taken right after `accept` (before any handshake).
    ///
    /// # Errors
    /// [`Refusal::Global`] when `max_connections` are open.
    pub fn admit(&self) -> Result<GlobalPermit, Refusal> {
        match self.global.clone().try_acquire_owned() {
            Ok(p) => Ok(GlobalPermit { _permit: p }),
            Err(_) => {
                self.refused_global.fetch_add(1, Ordering::Relaxed);
                Err(Refusal::Global)
            }
        }
    }

    /// A place under the per-peer cap for `peer`, once the peer is known.
    ///
    /// # Errors
    /// [`Refusal::Peer`] when `max_per_peer` connections of `peer` are open (the global place
    /// is released).
    pub fn admit_peer(
        self: &Arc<Self>,
        global: GlobalPermit,
        peer: PeerId,
    ) -> Result<ConnectionPermit, Refusal> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let n = peers.entry(peer.clone()).or_insert(0);
        if *n >= self.limits.max_per_peer {
            drop(peers);
            self.refused_peer.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Peer);
        }
        *n += 1;
        Ok(ConnectionPermit {
            _global: global,
            peer: Some((Arc::clone(self), peer)),
        })
    }

    /// A connection counted under the global cap only (no peer identity, e.g. in tests).
    pub fn without_peer(global: GlobalPermit) -> ConnectionPermit {
        ConnectionPermit {
            _global: global,
            peer: None,
        }
    }

    /// Answers a refused connection in the background ([`refuse`]), or, when
    /// [`MAX_REFUSING`] refusals are already being answered, closes it at once: a flood of
    /// refused connections holds at most that many sockets, each for well under a second.
    pub fn refuse<IO>(&self, io: IO, why: Refusal)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.refusing.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    refuse(io, why).await;
                    drop(permit);
                });
            }
            Err(_) => drop(io),
        }
    }

    pub fn stats(&self) -> GateStats {
        GateStats {
            open: self
                .limits
                .max_connections
                .saturating_sub(self.global.available_permits()),
            refused_global: self.refused_global.load(Ordering::Relaxed),
            refused_peer: self.refused_peer.load(Ordering::Relaxed),
        }
    }
}

/// Exports a gate's counters to Prometheus: `connections_open` (gauge) and
/// `connections_refused_total{reason="global"|"peer"}` (counter), under the registry's prefix.
#[derive(Debug)]
pub struct GateCollector(pub Arc<ConnectionGate>);

impl prometheus_client::collector::Collector for GateCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = self.0.stats();
        let open = ConstGauge::new(i64::try_from(s.open).unwrap_or(i64::MAX));
        open.encode(encoder.encode_descriptor(
            "connections_open",
            "Connections being served now",
            None,
            open.metric_type(),
        )?)?;
        let refused = ConstCounter::new(s.refused_global);
        let mut family = encoder.encode_descriptor(
            "connections_refused",
            "Connections answered 503 overloaded (global or per-peer cap)",
            None,
            refused.metric_type(),
        )?;
        for (reason, v) in [("global", s.refused_global), ("peer", s.refused_peer)] {
            let c = ConstCounter::new(v);
            c.encode(family.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}

/// Refusals answered at once, at most; further refused sockets are closed without an answer.
pub const MAX_REFUSING: usize = 1024;

/// Seconds in the `Retry-After` of a refusal.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The whole answer sent to a refused connection.
pub fn overloaded_response(why: Refusal) -> Vec<u8> {
    let message = match why {
        Refusal::Global => "too many connections; retry later",
        Refusal::Peer => "too many connections from this client; retry later",
    };
    let body = format!(r#"{{"error":{{"code":"overloaded","message":"{message}"}}}}"#);
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a refused connection with [`overloaded_response`] and closes it.
///
/// The request head is awaited first, for at most 100 ms (up to 16 KiB of it), so an ordinary
/// client sees the answer to the request it sent rather than a connection closed under it;
/// a client that sends nothing gets the answer after that wait. After the answer, whatever
/// the peer still sends is drained ([`crate::guarded_io::drain`]), because closing a socket with
/// unread input makes the kernel reset the connection and the peer would lose the answer.
/// The whole exchange takes at most 1.1 s, whatever the peer does.
pub async fn refuse<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, why: Refusal) {
    let mut head = Vec::with_capacity(1024);
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        let mut buf = [0u8; 2048];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let answer = overloaded_response(why);
    let written = tokio::time::timeout(Duration::from_millis(500), async {
        io.write_all(&answer).await?;
        io.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    crate::guarded_io::drain(&mut io).await;
}

/// Raises this process's soft limit of open files to its hard limit, so `max_connections`
/// sockets can actually be open (the usual default soft limit is 1024). Returns the soft
/// limit now in force, or `None` if it could not be read.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (l.current, l.maximum) {
        if cur < max {
            l.current = Some(max);
            if let Err(e) = setrlimit(Resource::Nofile, l) {
                tracing::warn!(error = %e, "cannot raise the open-file limit");
            }
        }
    }
    let now = getrlimit(Resource::Nofile);
    now.current
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn global_and_per_peer_caps() {
        let g = ConnectionGate::new(ConnectionLimits {
            max_connections: 3,
            max_per_peer: 2,
        });
        let a1 = g.admit_peer(g.admit().unwrap(), PeerId::Uid(1)).unwrap();
        let a2 = g.admit_peer(g.admit().unwrap(), PeerId::Uid(1)).unwrap();
        assert_eq!(
            g.admit_peer(g.admit().unwrap(), PeerId::Uid(1))
                .unwrap_err(),
            Refusal::Peer
        );
        let b1 = g.admit_peer(g.admit().unwrap(), PeerId::Uid(2)).unwrap();
        assert_eq!(g.admit().unwrap_err(), Refusal::Global);
        assert_eq!(
            g.stats(),
            GateStats {
                open: 3,
                refused_global: 1,
                refused_peer: 1
            }
        );
        drop(a1);
        let a3 = g.admit_peer(g.admit().unwrap(), PeerId::Uid(1)).unwrap();
        drop((a2, a3, b1));
        assert_eq!(g.stats().open, 0);
        assert!(g.peers.lock().unwrap().is_empty(), "no entry left behind");
    }

    #[test]
    fn refusal_is_a_complete_http_answer() {
        let r = String::from_utf8(overloaded_response(Refusal::Peer)).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("retry-after: 1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
    }
}
