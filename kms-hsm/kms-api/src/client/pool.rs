//! Connections: one HTTP/1.1 exchange on a pooled or new connection (Unix socket with the
//! peer's uid checked, or TLS with a client certificate), with its timeout and answer limit.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use crate::wire::ZeroizingBuf;

use super::*;

impl KmsClient {
    pub(super) async fn raw_once(
        &self,
        replica: &Replica,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        match tokio::time::timeout(timeout, self.exchange(replica, method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Unavailable(format!(
                "{path} timed out after {timeout:?}"
            ))),
        }
    }

    pub(super) async fn exchange(
        &self,
        replica: &Replica,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut sender = match take_idle(replica) {
            Some(s) => s,
            None => self.connect(replica).await?,
        };
        let host = match &replica.endpoint {
            Endpoint::Unix(_) => "kms".to_owned(),
            Endpoint::Https { host, port } => format!("{host}:{port}"),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        sender
            .ready()
            .await
            .map_err(|e| ClientError::Unavailable(format!("connection not ready: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Unavailable(format!("request failed: {e}")))?;
        let status = resp.status();
        // The KMS closes the connection after some answers (413, 403, a body timeout): such a
        // connection must not go back to the pool, where the next call would find it dead.
        let closing = resp
            .headers()
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        // Answers may carry plaintext: collected into zeroizing memory, frame by frame.
        let mut body = resp.into_body();
        let mut buf = ZeroizingBuf::with_capacity(1024);
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| ClientError::Unavailable(format!("reading answer failed: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len().saturating_add(data.len()) > MAX_ANSWER_BYTES {
                    return Err(ClientError::Protocol(format!(
                        "{path} answered more than {MAX_ANSWER_BYTES} bytes"
                    )));
                }
                buf.push(&data);
            }
        }
        let bytes = buf.into_bytes();
        if !closing {
            put_idle(replica, sender, self.inner.cfg.max_idle);
        }
        Ok((status, bytes))
    }

    pub(super) async fn connect(&self, replica: &Replica) -> Result<Sender, ClientError> {
        let timeout = self.inner.cfg.connect_timeout;
        let fut = async {
            match &replica.endpoint {
                Endpoint::Unix(path) => {
                    let s = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                        ClientError::Unavailable(format!("connect {}: {e}", path.display()))
                    })?;
                    if let Some(want) = self.inner.cfg.expected_peer_uid {
                        let uid = s.peer_cred().map(|c| c.uid()).map_err(|e| {
                            ClientError::Unavailable(format!("peer of {}: {e}", path.display()))
                        })?;
                        if uid != want {
                            tracing::error!(
                                socket = %path.display(),
                                uid,
                                expected = want,
                                "the process on the KMS socket is not the KMS's user; refusing it"
                            );
                            return Err(ClientError::Unavailable(format!(
                                "the process on {} runs as uid {uid}, not the configured KMS uid {want}",
                                path.display()
                            )));
                        }
                    }
                    handshake(TokioIo::new(s)).await
                }
                Endpoint::Https { host, port } => {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(|e| {
                            ClientError::Unavailable(format!("connect {host}:{port}: {e}"))
                        })?;
                    let _ = tcp.set_nodelay(true);
                    let tls = replica
                        .tls
                        .as_ref()
                        .ok_or_else(|| ClientError::Config("missing TLS settings".into()))?;
                    let name = ServerName::try_from(host.clone())
                        .map_err(|e| ClientError::Config(format!("server name {host}: {e}")))?;
                    let s = tls.connect(name, tcp).await.map_err(|e| {
                        ClientError::Unavailable(format!("TLS handshake with {host}:{port}: {e}"))
                    })?;
                    handshake(TokioIo::new(s)).await
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Unavailable(format!("connect timed out after {timeout:?}")))?
    }
}

pub(super) fn take_idle(replica: &Replica) -> Option<Sender> {
    let mut idle = replica.idle.lock().unwrap_or_else(|p| p.into_inner());
    while let Some(s) = idle.pop() {
        if !s.is_closed() {
            return Some(s);
        }
    }
    None
}

pub(super) fn put_idle(replica: &Replica, s: Sender, max_idle: usize) {
    if s.is_closed() {
        return;
    }
    let mut idle = replica.idle.lock().unwrap_or_else(|p| p.into_inner());
    if idle.len() < max_idle {
        idle.push(s);
    }
}

pub(super) async fn handshake<T>(io: T) -> Result<Sender, ClientError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ClientError::Unavailable(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "KMS connection closed");
        }
    });
    Ok(sender)
}
