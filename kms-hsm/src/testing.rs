//! Test doubles (compiled for unit tests only): a software [`KeyBackend`] that follows the
//! real wrapped-DEK format with an in-memory KEK, and can be switched "down".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kms_api::{KekId, KekVersion, KeyId, WrappedDek};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::backend::{
    parse_wrapped_header, wrap_aad, BackendError, BackendState, Dek, KekRef, KeyBackend,
    WrapFormat, DEK_LEN,
};
use crate::metrics::{BackendStats, HsmCounters};

pub struct MockBackend {
    kek: LessSafeKey,
    kek_ref: KekRef,
    rng: SystemRandom,
    down: AtomicBool,
    calls: AtomicU64,
    unwraps: AtomicU64,
    unwrap_delay_ms: AtomicU64,
}

impl MockBackend {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let mut k = [0u8; 32];
        rng.fill(&mut k).unwrap();
        Self {
            kek: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).unwrap()),
            kek_ref: KekRef {
                id: KekId::parse("mock-kek").unwrap(),
                version: KekVersion::FIRST,
            },
            rng,
            down: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            unwrap_delay_ms: AtomicU64::new(0),
        }
    }

    /// Makes every unwrap take `ms` milliseconds (so concurrent callers overlap).
    pub fn set_unwrap_delay_ms(&self, ms: u64) {
        self.unwrap_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Backend calls so far (generate, unwrap, health check).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn unwraps(&self) -> u64 {
        self.unwraps.load(Ordering::SeqCst)
    }

    fn check_up(&self) -> Result<(), BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(BackendError::Unavailable("mock HSM is down".into()))
        } else {
            Ok(())
        }
    }
}

impl KeyBackend for MockBackend {
    fn current_kek(&self) -> KekRef {
        self.kek_ref.clone()
    }

    async fn generate_dek(
        &self,
        key_id: &KeyId,
    ) -> Result<(Dek, WrappedDek, KekRef), BackendError> {
        self.check_up()?;
        let mut raw = Zeroizing::new([0u8; DEK_LEN]);
        self.rng.fill(raw.as_mut()).unwrap();
        let mut iv = [0u8; 12];
        self.rng.fill(&mut iv).unwrap();
        let mut buf = raw.to_vec();
        let tag = self
            .kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(wrap_aad(key_id, &self.kek_ref)),
                &mut buf,
            )
            .unwrap();
        let mut out = vec![WrapFormat::AesGcmV1 as u8];
        out.extend_from_slice(&self.kek_ref.version.get().to_be_bytes());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&buf);
        out.extend_from_slice(tag.as_ref());
        Ok((
            Dek::from_bytes(raw),
            WrappedDek::new(out),
            self.kek_ref.clone(),
        ))
    }

    async fn unwrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> Result<Dek, BackendError> {
        self.check_up()?;
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        let delay = self.unwrap_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let h = parse_wrapped_header(wrapped)?;
        let kek = KekRef {
            id: kek_id.clone(),
            version: h.kek_version,
        };
        if kek != self.kek_ref {
            return Err(BackendError::KekNotFound {
                id: kek.id,
                version: kek.version,
            });
        }
        let b = wrapped.as_bytes();
        let nonce = Nonce::try_assume_unique_for_key(&b[5..17]).unwrap();
        let mut buf = Zeroizing::new(b[17..].to_vec());
        let plain = self
            .kek
            .open_in_place(nonce, Aad::from(wrap_aad(key_id, &kek)), &mut buf)
            .map_err(|_| BackendError::InvalidWrapped)?;
        let mut raw = Zeroizing::new([0u8; DEK_LEN]);
        raw.copy_from_slice(plain);
        Ok(Dek::from_bytes(raw))
    }

    async fn health_check(&self) -> Result<(), BackendError> {
        self.check_up()
    }

    fn state(&self) -> BackendState {
        if self.down.load(Ordering::SeqCst) {
            BackendState::Recovering
        } else {
            BackendState::Ready
        }
    }
}

impl BackendStats for MockBackend {
    fn hsm_counters(&self) -> HsmCounters {
        HsmCounters {
            calls: self.calls.load(Ordering::SeqCst),
            errors: 0,
            recoveries: 0,
            ..HsmCounters::default()
        }
    }
}
