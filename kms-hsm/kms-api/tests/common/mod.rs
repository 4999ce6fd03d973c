//! A stub KMS on a real Unix socket for the client's tests (`client_resilience`,
//! `client_replicas`): the test scripts every answer from the request's path and body. The
//! real KMS is tested elsewhere (kms-hsm/tests, the end-to-end tests); here only the client's
//! logic is.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kms_api::client::Endpoint;

/// The scripted behaviours of the tests' stubs (each test's stub maps them to [`Answer`]s).
pub(crate) mod mode {
    /// Answers as a healthy KMS does.
    pub(crate) const OK: u8 = 0;
    /// 503 `unavailable`.
    pub(crate) const UNAVAILABLE: u8 = 1;
    /// 503 `overloaded`.
    pub(crate) const OVERLOADED: u8 = 2;
    /// Reads the request, then closes the connection without answering.
    pub(crate) const DROP: u8 = 3;
    /// Never answers.
    pub(crate) const HANG: u8 = 4;
}

/// What the stub does with one request.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Answers this status and JSON body.
    Json(u16, String),
    /// Reads the request, then closes the connection without answering (a KMS killed after it
    /// acted).
    Drop,
    /// Never answers (a hung KMS).
    Hang,
}

/// A stub KMS; the socket goes with it.
#[derive(Debug)]
pub(crate) struct StubKms {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl StubKms {
    /// Serves `answer(path, body)` for every request until the test ends.
    pub(crate) async fn start(
        answer: impl Fn(&str, &Bytes) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            match answer(&path, &body) {
                                Answer::Json(status, text) => Ok(hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap()),
                                // Never answered: the connection task ends with the error.
                                Answer::Drop => Err(std::io::Error::other("dropped")),
                                Answer::Hang => std::future::pending().await,
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        StubKms { _dir: dir, socket }
    }

    pub(crate) fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }
}

/// A valid `/encrypt` answer.
pub(crate) const ENCRYPTED: &str =
    r#"{"ciphertext":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","key_version":1}"#;
