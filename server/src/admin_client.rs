//! The operator tools' client of the running server's admin API (`progressdb backup`,
//! `progressdb verify`): the address of the config's `http.listen` (loopback when it listens
//! on every address), the first admin key of `auth.keys_file`, one HTTP/1 connection per
//! request.

use std::net::SocketAddr;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use zeroize::Zeroizing;

use crate::config::Config;

/// A client of one server's admin API.
pub struct AdminClient {
    addr: SocketAddr,
    key: Zeroizing<String>,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// The client of the server configured by `cfg`.
    ///
    /// # Errors
    /// A one-line reason when the keys file cannot be read or lists no admin key.
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        let key = crate::auth::first_admin_key(&cfg.auth.keys_file).map_err(|e| e.to_string())?;
        let mut addr = cfg.http.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Ok(Self { addr, key })
    }

    /// Sends `method path` with `body` (JSON); the status and the body still to read.
    ///
    /// # Errors
    /// A one-line reason when the server cannot be reached.
    pub async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(http::StatusCode, Incoming), String> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the server at {} (is it running?): {e}",
                    self.addr
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP to {}: {e}", self.addr))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let bearer = Zeroizing::new(format!("Bearer {}", self.key.as_str()));
        let mut auth = http::HeaderValue::from_str(&bearer)
            .map_err(|_| "the admin key is not a valid header value".to_owned())?;
        auth.set_sensitive(true);
        let req = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::AUTHORIZATION, auth)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status();
        Ok((status, resp.into_body()))
    }

    /// Sends `method path` with `body` and reads a JSON answer.
    ///
    /// # Errors
    /// A one-line reason when the server cannot be reached or answers an error (with its
    /// status and body).
    pub async fn json(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let (status, b) = self.send(method.clone(), path, body).await?;
        let bytes = b
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{method} {path}: {e}"))
    }
}

/// Reads the rest of `body` as text (for an error answer).
pub async fn text(body: Incoming) -> String {
    body.collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default()
}
