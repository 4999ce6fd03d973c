//! The [`KeyBackend`] trait: what the KMS needs from the holder of its KEKs, and the
//! [`BackendState`] it reports.

use std::future::Future;

use kms_api::{KekId, KekVersion, KeyId, WrappedDek};

use super::{
    not_resident, BackendError, Dek, DekResidency, KekMissing, KekRef, ResidentItem, ResidentKey,
};

/// What the KMS needs from the holder of its KEKs.
///
/// Implementations must be cheap to share (`Send + Sync`); methods never block the async
/// runtime (the PKCS#11 backend runs HSM calls on its own worker threads).
pub trait KeyBackend: Send + Sync + 'static {
    /// The KEK used for new wraps.
    fn current_kek(&self) -> KekRef;

    /// Generates a 256-bit DEK with the HSM's random generator and wraps it under the current
    /// KEK in [`WrapFormat::for_kek`] of its class, bound to `key_id`. Returns the raw DEK too, so the
    /// caller can seed its cache without an unwrap round trip.
    ///
    /// # Errors
    /// `Unavailable` when the HSM cannot be used (nothing was created: the DEK only exists in
    /// memory until the caller stores the wrapped form); `KekNotFound` when the current KEK is
    /// missing; `Internal` otherwise.
    ///
    /// [`WrapFormat::for_kek`]: super::WrapFormat::for_kek
    fn generate_dek(
        &self,
        key_id: &KeyId,
    ) -> impl Future<Output = Result<(Dek, WrappedDek, KekRef), BackendError>> + Send;

    /// Unwraps `wrapped` (made for `key_id`) through the HSM.
    ///
    /// # Errors
    /// `InvalidWrapped` when the blob is malformed or does not authenticate (opaque);
    /// `KekNotFound` when its KEK version is not in the token; `Unavailable` when the HSM
    /// cannot be used now.
    fn unwrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<Dek, BackendError>> + Send;

    /// Checks that `wrapped` (made for `key_id`) unwraps and authenticates, without handing
    /// out the DEK: verification passes and restores use it. In hsm residency an `AesKwV2`
    /// DEK is unwrapped into a session object, checked by the HSM and destroyed.
    ///
    /// # Errors
    /// As [`KeyBackend::unwrap_dek`].
    fn check_wrapped(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let unwrapped = self.unwrap_dek(key_id, kek_id, wrapped);
        async move { unwrapped.await.map(drop) }
    }

    /// Unwraps `wrapped` (made for `key_id` under an older KEK version) and wraps the same
    /// DEK again under the current KEK, inside one HSM job: the DEK bytes never leave the
    /// backend and are zeroized at once. KEK rotation moves every record this way.
    ///
    /// # Errors
    /// As [`KeyBackend::unwrap_dek`] for the unwrap; `Unavailable`/`Overloaded` when the HSM
    /// cannot take the job now (nothing changed: the caller keeps the old blob).
    fn rewrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send;

    /// The KEK versions present in the HSM, ascending (one entry per object, so a duplicate
    /// shows twice).
    ///
    /// # Errors
    /// `Unavailable` when the HSM cannot be asked now.
    fn kek_versions(&self) -> impl Future<Output = Result<Vec<KekVersion>, BackendError>> + Send;

    /// Makes KEK `version` known and checked, and current for new wraps when it is newer
    /// than the current one. A version that exists and passes the checks is adopted, never
    /// made twice; a missing one is generated inside the token with the same hardened
    /// attributes as the first one when `missing` is [`KekMissing::Generate`] (a rotation),
    /// and refused with [`KekMissing::Adopt`] (a replica following a rotation another one
    /// made).
    ///
    /// # Errors
    /// `KekRefused` when an object with that label and version exists but is not a hardened
    /// KEK (it is not used); `KekNotFound` when it is missing and `missing` is `Adopt`;
    /// `Unavailable` for device errors; `Internal` when the token refuses to generate the
    /// key. On error the current KEK is unchanged.
    fn ensure_kek_version(
        &self,
        version: KekVersion,
        missing: KekMissing,
    ) -> impl Future<Output = Result<KekRef, BackendError>> + Send;

    /// Destroys every object of KEK `version` in the HSM; afterwards the backend answers
    /// `KekNotFound` for blobs under it. The caller has checked that nothing depends on it.
    ///
    /// # Errors
    /// `Config` when `version` is the current KEK (never destroyed); `KekNotFound` when no
    /// object has that version; `Unavailable` for device errors.
    fn destroy_kek_version(
        &self,
        version: KekVersion,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Extends the audit chain: for each message `m_i`, `mac_i = HMAC-SHA256(audit key,
    /// mac_{i-1} || m_i)` computed inside the HSM, starting from `prev`. One HSM job for the
    /// whole batch.
    ///
    /// # Errors
    /// `HmacKey` when the audit key is missing or refused; `Unavailable`/`Overloaded`.
    fn audit_chain(
        &self,
        prev: [u8; 32],
        messages: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<[u8; 32]>, BackendError>> + Send;

    /// Where this backend keeps unwrapped DEKs. With [`DekResidency::Hsm`] the service never
    /// asks for DEK bytes: it calls the `*_resident` methods, and [`KeyBackend::generate_dek`]
    /// and [`KeyBackend::unwrap_dek`] refuse with `Config`.
    fn residency(&self) -> DekResidency {
        DekResidency::Memory
    }

    /// [`DekResidency::Hsm`]: generates a DEK as a key object inside the HSM, wraps it under
    /// the current (wrap-class) KEK, and keeps a non-extractable session object of it for
    /// later use. No DEK bytes are returned, or exist outside the HSM.
    ///
    /// # Errors
    /// `Config` when the backend is not in hsm residency or the current KEK is not
    /// wrap-class; `Unavailable`/`Overloaded` as [`KeyBackend::generate_dek`] (nothing was
    /// created but, at worst, a session object that is destroyed).
    fn generate_resident(
        &self,
        _key_id: &KeyId,
    ) -> impl Future<Output = Result<(WrappedDek, KekRef), BackendError>> + Send {
        std::future::ready(Err(not_resident()))
    }

    /// [`DekResidency::Hsm`]: encrypts each item with AES-256-GCM inside the HSM under the
    /// DEK of `key` (unwrapped into a session object on first use), returning `nonce |
    /// ciphertext | tag` per item, in order. Large batches are spread over the sessions.
    ///
    /// # Errors
    /// The whole call: `InvalidWrapped` when `key`'s blob does not unwrap or its check fails;
    /// `KekNotFound`, `Unavailable`, `Overloaded` as [`KeyBackend::unwrap_dek`]; `Config`
    /// when not in hsm residency. Per item: `Internal` when the HSM refused that message.
    fn seal_resident(
        &self,
        _key: &ResidentKey,
        _items: Vec<ResidentItem>,
    ) -> impl Future<Output = Result<Vec<Result<Vec<u8>, BackendError>>, BackendError>> + Send {
        std::future::ready(Err(not_resident()))
    }

    /// [`DekResidency::Hsm`]: decrypts each item (`nonce | ciphertext | tag`) inside the HSM
    /// under the DEK of `key`; one result per item, in order.
    ///
    /// # Errors
    /// The whole call as [`KeyBackend::seal_resident`]. Per item: `InvalidWrapped` for a
    /// message that does not authenticate (the caller answers its opaque decrypt failure).
    #[allow(clippy::type_complexity)]
    fn open_resident(
        &self,
        _key: &ResidentKey,
        _items: Vec<ResidentItem>,
    ) -> impl Future<
        Output = Result<Vec<Result<zeroize::Zeroizing<Vec<u8>>, BackendError>>, BackendError>,
    > + Send {
        std::future::ready(Err(not_resident()))
    }

    /// [`DekResidency::Hsm`]: destroys every session object of `key_id`'s DEK (a destroyed
    /// key, or one the service's cache let go). Best effort: a session whose queue is full
    /// destroys it when its bounded object cache evicts it.
    fn forget_resident(&self, _key_id: &KeyId) {}

    /// One real round trip to the HSM (e.g. a random-number request on a pooled session).
    ///
    /// # Errors
    /// `Unavailable` when the HSM does not answer correctly.
    fn health_check(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// What the backend can do now, without a round trip; `/readyz` reports unready unless
    /// [`BackendState::Ready`].
    fn state(&self) -> BackendState;

    /// `state() == Ready`.
    fn is_ready(&self) -> bool {
        self.state() == BackendState::Ready
    }
}

/// Whether a backend can serve, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Ready,
    /// Sessions are being re-established after a loss; the backend heals by itself.
    Recovering,
    /// The token refused the PIN; nothing happens until an operator fixes it and restarts.
    PinRejected,
}

impl BackendState {
    /// A short reason safe to show to callers.
    pub fn reason(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::Recovering => "HSM sessions are being re-established",
            BackendState::PinRejected => {
                "the HSM refused the PIN; fix hsm.pin_file and restart the KMS"
            }
        }
    }
}
