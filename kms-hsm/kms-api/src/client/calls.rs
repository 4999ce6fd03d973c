//! The KMS calls, one method per endpoint of the key API (create, encrypt, decrypt and their
//! batches, get-wrapped, destroy, readiness) and the raw call for tests and tools.

use bytes::Bytes;
use http::Method;
use serde::Serialize;

use super::{ClientError, KmsClient};
use crate::ids::{IdempotencyKey, KeyId, ThreadId};
use crate::wire::{
    BatchResponse, Bytes64, CreateDekRequest, CreateDekResponse, DecryptRequest, DecryptResponse,
    DestroyKeyRequest, DestroyKeyResponse, EncryptRequest, EncryptResponse, GetWrappedResponse,
    ItemResult, SecretBytes,
};

impl KmsClient {
    /// Creates a DEK for `thread_id`.
    ///
    /// # Errors
    /// [`ClientError`]; `Unavailable` when the KMS or its HSM is down.
    pub async fn create_dek_for_thread(
        &self,
        thread_id: &ThreadId,
    ) -> Result<CreateDekResponse, ClientError> {
        // One key for every attempt of this call, on whichever replica: an attempt whose
        // answer was lost is answered again, not made twice.
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| ClientError::Config("the system random generator failed".into()))?;
        let req = CreateDekRequest {
            thread_id: thread_id.clone(),
            idempotency_key: Some(
                IdempotencyKey::parse(&hex::encode(nonce))
                    .map_err(|e| ClientError::Protocol(e.to_string()))?,
            ),
        };
        self.call_json(Method::POST, "/create_dek_for_thread", Some(&req))
            .await
    }

    /// Encrypts `plaintext` under `key_id`'s DEK with `aad`.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownKey, .. }` for an unknown key.
    pub async fn encrypt(
        &self,
        key_id: &KeyId,
        plaintext: &[u8],
        aad: Option<&[u8]>,
    ) -> Result<EncryptResponse, ClientError> {
        let req = EncryptRequest {
            key_id: key_id.clone(),
            plaintext: SecretBytes::new(plaintext.to_vec()),
            aad: aad.map(|a| Bytes64(a.to_vec())),
        };
        self.call_json(Method::POST, "/encrypt", Some(&req)).await
    }

    /// Decrypts `ciphertext` (`nonce | ct | tag`) under `key_id`'s DEK with `aad`.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: DecryptionFailed, .. }` for any authentication failure.
    pub async fn decrypt(
        &self,
        key_id: &KeyId,
        ciphertext: &[u8],
        aad: Option<&[u8]>,
    ) -> Result<SecretBytes, ClientError> {
        let req = DecryptRequest {
            key_id: key_id.clone(),
            ciphertext: Bytes64(ciphertext.to_vec()),
            aad: aad.map(|a| Bytes64(a.to_vec())),
        };
        let r: DecryptResponse = self.call_json(Method::POST, "/decrypt", Some(&req)).await?;
        Ok(r.plaintext)
    }

    /// One call for many encryptions; one result per item, in order.
    ///
    /// # Errors
    /// [`ClientError`] when the whole call fails; per-item failures are in the results.
    pub async fn encrypt_batch(
        &self,
        items: &[EncryptRequest],
    ) -> Result<Vec<ItemResult<EncryptResponse>>, ClientError> {
        let refs: Vec<&EncryptRequest> = items.iter().collect();
        self.encrypt_batch_refs(&refs).await
    }

    /// [`KmsClient::encrypt_batch`] of borrowed items (to resend some of a batch).
    ///
    /// # Errors
    /// As [`KmsClient::encrypt_batch`].
    pub async fn encrypt_batch_refs(
        &self,
        items: &[&EncryptRequest],
    ) -> Result<Vec<ItemResult<EncryptResponse>>, ClientError> {
        let r: BatchResponse<EncryptResponse> = self
            .call_json(Method::POST, "/encrypt_batch", Some(&BatchItems { items }))
            .await?;
        check_len(items.len(), r.results)
    }

    /// One call for many decryptions; one result per item, in order.
    ///
    /// # Errors
    /// [`ClientError`] when the whole call fails; per-item failures are in the results.
    pub async fn decrypt_batch(
        &self,
        items: &[DecryptRequest],
    ) -> Result<Vec<ItemResult<DecryptResponse>>, ClientError> {
        let refs: Vec<&DecryptRequest> = items.iter().collect();
        self.decrypt_batch_refs(&refs).await
    }

    /// [`KmsClient::decrypt_batch`] of borrowed items (to resend some of a batch).
    ///
    /// # Errors
    /// As [`KmsClient::decrypt_batch`].
    pub async fn decrypt_batch_refs(
        &self,
        items: &[&DecryptRequest],
    ) -> Result<Vec<ItemResult<DecryptResponse>>, ClientError> {
        let r: BatchResponse<DecryptResponse> = self
            .call_json(Method::POST, "/decrypt_batch", Some(&BatchItems { items }))
            .await?;
        check_len(items.len(), r.results)
    }

    /// The wrapped DEK and KEK metadata of `key_id`.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownKey, .. }` for an unknown key.
    pub async fn get_wrapped(&self, key_id: &KeyId) -> Result<GetWrappedResponse, ClientError> {
        let path = format!("/get_wrapped?key_id={}", key_id.as_str());
        self.call_json::<(), _>(Method::GET, &path, None).await
    }

    /// Destroys `key_id`'s DEK (its wrapped form and any cached copy). Idempotent: destroying
    /// a destroyed key succeeds.
    ///
    /// # Errors
    /// [`ClientError`]; `Api { code: UnknownKey, .. }` for a key that never existed.
    pub async fn destroy_key(&self, key_id: &KeyId) -> Result<DestroyKeyResponse, ClientError> {
        let req = DestroyKeyRequest {
            key_id: key_id.clone(),
        };
        self.call_json(Method::POST, "/destroy_key", Some(&req))
            .await
    }

    /// `Ok(())` when the KMS (with replicas: at least one of them) answers `/readyz` with
    /// 200. Every replica is probed, past its circuit, so a readiness probe finds a KMS back
    /// and closes its circuit.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] otherwise (the first replica's reason).
    pub async fn ready(&self) -> Result<(), ClientError> {
        let probes = (0..self.inner.replicas.len()).map(|i| self.probe(i));
        let results = futures_util::future::join_all(probes).await;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| ClientError::Unavailable("no KMS endpoint".into())))
    }

    /// Sends raw bytes once (no retry) to the first replica and returns the status and body.
    /// For tests and tools.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] for transport failures.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ClientError> {
        let timeout = self.inner.cfg.request_timeout;
        let (s, b) = self
            .raw_once(self.first(), method, path, Bytes::from(body), timeout)
            .await?;
        Ok((s.as_u16(), b))
    }
}

/// The body of a batch call, borrowing its items (the shape of [`crate::wire::BatchRequest`]),
/// so a caller keeps them to split and resend after a 413.
#[derive(Serialize)]
struct BatchItems<'a, T> {
    items: &'a [T],
}

fn check_len<T>(n: usize, results: Vec<ItemResult<T>>) -> Result<Vec<ItemResult<T>>, ClientError> {
    if results.len() == n {
        Ok(results)
    } else {
        Err(ClientError::Protocol(format!(
            "batch of {n} items answered with {} results",
            results.len()
        )))
    }
}
