//! A minimal stand-in for `progressdb-kms` over a Unix socket: the documented JSON API with
//! AES-256-GCM (ring) and DEKs kept in memory. It records calls, so tests can check the
//! server's coalescing and crypto-shredding. Keys survive `stop`/`start` (shared `State`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kms_api::wire::{
    BatchRequest, BatchResponse, Bytes64, CreateDekRequest, CreateDekResponse, DecryptRequest,
    DecryptResponse, DestroyKeyRequest, DestroyKeyResponse, EncryptRequest, EncryptResponse,
    ErrorBody, ErrorCode, ErrorDetail, ItemResult, SecretBytes,
};
use kms_api::{KekId, KekVersion, KeyId, WrappedDek};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

/// Keys and call records, shared across restarts.
#[derive(Default)]
pub(crate) struct State {
    keys: Mutex<HashMap<String, [u8; 32]>>,
    /// Calls by path.
    pub calls: Mutex<HashMap<String, usize>>,
    /// Sizes of every batch call.
    pub batch_sizes: Mutex<Vec<usize>>,
    pub destroyed: Mutex<Vec<String>>,
}

impl State {
    pub(crate) fn calls(&self, path: &str) -> usize {
        self.calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

pub(crate) struct FakeKms {
    pub path: PathBuf,
    pub state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn seal(dek: &[u8; 32], aad: &[u8], pt: &[u8]) -> Vec<u8> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, dek).unwrap());
    let mut nonce = [0u8; 12];
    SystemRandom::new().fill(&mut nonce).unwrap();
    let mut buf = pt.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .unwrap();
    let mut out = nonce.to_vec();
    out.extend(buf);
    out
}

fn open(dek: &[u8; 32], aad: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
    if ct.len() < 28 {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, dek).unwrap());
    let nonce = Nonce::try_assume_unique_for_key(&ct[..12]).ok()?;
    let mut buf = ct[12..].to_vec();
    let pt = key.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?;
    Some(pt.to_vec())
}

fn err<T>(code: ErrorCode) -> ItemResult<T> {
    ItemResult::Error(ErrorDetail {
        code,
        message: code.as_str().into(),
    })
}

fn json<T: serde::Serialize>(status: u16, v: &T) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r
}

impl State {
    fn encrypt(&self, r: &EncryptRequest) -> ItemResult<EncryptResponse> {
        let keys = self.keys.lock().unwrap();
        let Some(dek) = keys.get(r.key_id.as_str()) else {
            return err(ErrorCode::UnknownKey);
        };
        let aad = r.aad.as_ref().map(|a| a.0.as_slice()).unwrap_or(&[]);
        ItemResult::Ok(EncryptResponse {
            ciphertext: Bytes64(seal(dek, aad, r.plaintext.expose())),
            key_version: KekVersion::FIRST,
        })
    }

    fn decrypt(&self, r: &DecryptRequest) -> ItemResult<DecryptResponse> {
        let keys = self.keys.lock().unwrap();
        let Some(dek) = keys.get(r.key_id.as_str()) else {
            return err(ErrorCode::UnknownKey);
        };
        let aad = r.aad.as_ref().map(|a| a.0.as_slice()).unwrap_or(&[]);
        match open(dek, aad, &r.ciphertext.0) {
            Some(pt) => ItemResult::Ok(DecryptResponse {
                plaintext: SecretBytes::new(pt),
            }),
            None => err(ErrorCode::DecryptionFailed),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        *self.calls.lock().unwrap().entry(path.clone()).or_default() += 1;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let bad = || json(400, &ErrorBody::new(ErrorCode::MalformedRequest, "bad"));
        match path.as_str() {
            "/readyz" | "/healthz" => json(200, &serde_json::json!({"ready": true})),
            "/create_dek_for_thread" => {
                let Ok(_r) = serde_json::from_slice::<CreateDekRequest>(&body) else {
                    return bad();
                };
                let mut id = [0u8; 16];
                let mut dek = [0u8; 32];
                SystemRandom::new().fill(&mut id).unwrap();
                SystemRandom::new().fill(&mut dek).unwrap();
                let key_id = KeyId::from_random(id);
                self.keys
                    .lock()
                    .unwrap()
                    .insert(key_id.as_str().to_owned(), dek);
                json(
                    200,
                    &CreateDekResponse {
                        key_id,
                        wrapped: WrappedDek::new(vec![0x01; 40]),
                        kek_id: KekId::parse("test-kek").unwrap(),
                        kek_version: KekVersion::FIRST,
                    },
                )
            }
            "/encrypt" => {
                let Ok(r) = serde_json::from_slice::<EncryptRequest>(&body) else {
                    return bad();
                };
                match self.encrypt(&r) {
                    ItemResult::Ok(v) => json(200, &v),
                    ItemResult::Error(e) => json(e.code.status(), &ErrorBody { error: e }),
                }
            }
            "/decrypt" => {
                let Ok(r) = serde_json::from_slice::<DecryptRequest>(&body) else {
                    return bad();
                };
                match self.decrypt(&r) {
                    ItemResult::Ok(v) => json(200, &v),
                    ItemResult::Error(e) => json(e.code.status(), &ErrorBody { error: e }),
                }
            }
            "/encrypt_batch" => {
                let Ok(r) = serde_json::from_slice::<BatchRequest<EncryptRequest>>(&body) else {
                    return bad();
                };
                self.batch_sizes.lock().unwrap().push(r.items.len());
                let results = r.items.iter().map(|i| self.encrypt(i)).collect();
                json(200, &BatchResponse { results })
            }
            "/decrypt_batch" => {
                let Ok(r) = serde_json::from_slice::<BatchRequest<DecryptRequest>>(&body) else {
                    return bad();
                };
                self.batch_sizes.lock().unwrap().push(r.items.len());
                let results = r.items.iter().map(|i| self.decrypt(i)).collect();
                json(200, &BatchResponse { results })
            }
            "/destroy_key" => {
                let Ok(r) = serde_json::from_slice::<DestroyKeyRequest>(&body) else {
                    return bad();
                };
                let removed = self.keys.lock().unwrap().remove(r.key_id.as_str());
                // Like the real KMS: destroying a destroyed key succeeds (a tombstone
                // remains); a key that never existed is unknown.
                let known_destroyed = self
                    .destroyed
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|k| k == r.key_id.as_str());
                if removed.is_none() && !known_destroyed {
                    return json(404, &ErrorBody::new(ErrorCode::UnknownKey, "unknown key"));
                }
                if removed.is_some() {
                    self.destroyed
                        .lock()
                        .unwrap()
                        .push(r.key_id.as_str().to_owned());
                }
                json(
                    200,
                    &DestroyKeyResponse {
                        key_id: r.key_id,
                        state: kms_api::wire::KeyState::Destroyed,
                    },
                )
            }
            _ => json(404, &ErrorBody::new(ErrorCode::NotFound, "no route")),
        }
    }
}

impl FakeKms {
    /// Serves `state` on a Unix socket at `path`.
    pub(crate) fn start(path: &Path, state: Arc<State>) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    r = listener.accept() => {
                        let Ok((s, _)) = r else { continue };
                        let st = st.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let st = st.clone();
                                async move { Ok::<_, Infallible>(st.handle(req).await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(s), svc)
                                .await;
                        });
                    }
                }
            }
            // "Crash": drop every open connection too.
            conns.abort_all();
        });
        Self {
            path: path.to_owned(),
            state,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Stops serving and removes the socket: the KMS is down.
    pub(crate) async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
