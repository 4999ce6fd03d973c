//! The mock backend (compiled for unit tests only): a software [`KeyBackend`] that follows the
//! real wrapped-DEK format with in-memory KEK versions, and can be switched "down".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use kms_api::{KekId, KekVersion, KeyId, WrappedDek};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::backend::{
    parse_wrapped_header, wrap_aad, BackendError, BackendState, Dek, KekMissing, KekRef,
    KeyBackend, WrapFormat, DEK_LEN,
};
use crate::metrics::{BackendStats, HsmCounters};

pub(crate) struct MockBackend {
    keks: Mutex<BTreeMap<KekVersion, LessSafeKey>>,
    kek_ref: Mutex<KekRef>,
    rewraps: AtomicU64,
    audit_key: ring::hmac::Key,
    rng: SystemRandom,
    down: AtomicBool,
    calls: AtomicU64,
    unwraps: AtomicU64,
    unwrap_delay_ms: AtomicU64,
}

impl MockBackend {
    pub(crate) fn new() -> Self {
        let rng = SystemRandom::new();
        let first = Self::new_kek(&rng);
        Self {
            keks: Mutex::new(BTreeMap::from([(KekVersion::FIRST, first)])),
            kek_ref: Mutex::new(KekRef {
                id: KekId::parse("mock-kek").unwrap(),
                version: KekVersion::FIRST,
            }),
            rewraps: AtomicU64::new(0),
            audit_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).unwrap(),
            rng,
            down: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            unwrap_delay_ms: AtomicU64::new(0),
        }
    }

    fn new_kek(rng: &SystemRandom) -> LessSafeKey {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill(k.as_mut()).unwrap();
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.as_ref()).unwrap())
    }

    /// A fresh DEK for `key_id` wrapped under KEK `version` (which must exist).
    pub(crate) fn generate_dek_under(&self, key_id: &KeyId, version: KekVersion) -> WrappedDek {
        let kek = KekRef {
            id: self.current_kek().id,
            version,
        };
        self.seal(key_id, &kek, &[7u8; DEK_LEN]).unwrap()
    }

    /// Rewraps done so far.
    pub(crate) fn rewraps(&self) -> u64 {
        self.rewraps.load(Ordering::SeqCst)
    }

    fn seal(&self, key_id: &KeyId, kek: &KekRef, raw: &[u8]) -> Result<WrappedDek, BackendError> {
        let keks = self.keks.lock().unwrap();
        let key = keks.get(&kek.version).ok_or(BackendError::KekNotFound {
            id: kek.id.clone(),
            version: kek.version,
        })?;
        let mut iv = [0u8; 12];
        self.rng.fill(&mut iv).unwrap();
        let mut buf = raw.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(wrap_aad(key_id, kek)),
                &mut buf,
            )
            .unwrap();
        let header = crate::backend::WrappedHeader {
            format: WrapFormat::AesGcmV1,
            kek_version: kek.version,
        };
        header.encode(&[&iv, &buf, tag.as_ref()])
    }

    fn open(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> Result<Dek, BackendError> {
        let h = parse_wrapped_header(wrapped)?;
        let kek = KekRef {
            id: kek_id.clone(),
            version: h.kek_version,
        };
        let keks = self.keks.lock().unwrap();
        let key = match keks.get(&kek.version) {
            Some(k) if kek.id == self.kek_ref.lock().unwrap().id => k,
            _ => {
                return Err(BackendError::KekNotFound {
                    id: kek.id,
                    version: kek.version,
                })
            }
        };
        let b = wrapped.as_bytes();
        let nonce = Nonce::try_assume_unique_for_key(
            &b[crate::backend::WRAPPED_HEADER_LEN..crate::backend::WRAPPED_HEADER_LEN + 12],
        )
        .unwrap();
        let mut buf = Zeroizing::new(b[17..].to_vec());
        let plain = key
            .open_in_place(nonce, Aad::from(wrap_aad(key_id, &kek)), &mut buf)
            .map_err(|_| BackendError::InvalidWrapped)?;
        let mut raw = Zeroizing::new([0u8; DEK_LEN]);
        raw.copy_from_slice(plain);
        Ok(Dek::from_bytes(raw))
    }

    /// Makes every unwrap take `ms` milliseconds (so concurrent callers overlap).
    pub(crate) fn set_unwrap_delay_ms(&self, ms: u64) {
        self.unwrap_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Backend calls so far (generate, unwrap, health check).
    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub(crate) fn unwraps(&self) -> u64 {
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
        self.kek_ref.lock().unwrap().clone()
    }

    async fn generate_dek(
        &self,
        key_id: &KeyId,
    ) -> Result<(Dek, WrappedDek, KekRef), BackendError> {
        self.check_up()?;
        let mut raw = Zeroizing::new([0u8; DEK_LEN]);
        self.rng.fill(raw.as_mut()).unwrap();
        let kek = self.current_kek();
        let blob = self.seal(key_id, &kek, raw.as_ref())?;
        Ok((Dek::from_bytes(raw), blob, kek))
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
        self.open(key_id, kek_id, wrapped)
    }

    async fn rewrap_dek(
        &self,
        key_id: &KeyId,
        kek_id: &KekId,
        wrapped: &WrappedDek,
    ) -> Result<(WrappedDek, KekRef), BackendError> {
        self.check_up()?;
        // A rewrap unwraps first: it takes as long.
        let delay = self.unwrap_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let dek = self.open(key_id, kek_id, wrapped)?;
        let kek = self.current_kek();
        let blob = self.seal(key_id, &kek, dek.expose())?;
        self.rewraps.fetch_add(1, Ordering::SeqCst);
        Ok((blob, kek))
    }

    async fn kek_versions(&self) -> Result<Vec<KekVersion>, BackendError> {
        self.check_up()?;
        Ok(self.keks.lock().unwrap().keys().copied().collect())
    }

    async fn ensure_kek_version(
        &self,
        version: KekVersion,
        missing: KekMissing,
    ) -> Result<KekRef, BackendError> {
        self.check_up()?;
        {
            let mut keks = self.keks.lock().unwrap();
            if let std::collections::btree_map::Entry::Vacant(slot) = keks.entry(version) {
                if missing == KekMissing::Adopt {
                    return Err(BackendError::KekNotFound {
                        id: self.current_kek().id,
                        version,
                    });
                }
                slot.insert(Self::new_kek(&self.rng));
            }
        }
        let mut current = self.kek_ref.lock().unwrap();
        if version > current.version {
            current.version = version;
        }
        Ok(KekRef {
            id: current.id.clone(),
            version,
        })
    }

    async fn destroy_kek_version(&self, version: KekVersion) -> Result<(), BackendError> {
        self.check_up()?;
        let current = self.current_kek();
        if current.version == version {
            return Err(BackendError::Config("current KEK".into()));
        }
        match self.keks.lock().unwrap().remove(&version) {
            Some(_) => Ok(()),
            None => Err(BackendError::KekNotFound {
                id: current.id,
                version,
            }),
        }
    }

    async fn audit_chain(
        &self,
        prev: [u8; 32],
        messages: Vec<Vec<u8>>,
    ) -> Result<Vec<[u8; 32]>, BackendError> {
        self.check_up()?;
        let mut prev = prev;
        let mut out = Vec::new();
        for m in messages {
            let mut ctx = ring::hmac::Context::with_key(&self.audit_key);
            ctx.update(&prev);
            ctx.update(&m);
            let mut mac = [0u8; 32];
            mac.copy_from_slice(ctx.sign().as_ref());
            out.push(mac);
            prev = mac;
        }
        Ok(out)
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
