//! A worker's live session: the session, the object handles found through it (KEKs, the audit
//! and binding keys, checked once per session) and, in hsm residency, its bounded map of DEK
//! session objects.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use kms_api::KeyId;

use super::super::token::{self, OpError};
use super::*;
use crate::backend::{BackendError, HmacRole, KekClass, KekRef};

/// A session the worker owns, with the object handles found through it.
pub(super) struct Live {
    pub(super) session: Session,
    pub(super) slot: Slot,
    pub(super) generation: u64,
    pub(super) keks: HashMap<KekRef, (ObjectHandle, KekClass)>,
    /// The audit key's handle, found (and checked) once per session.
    pub(super) audit: Option<ObjectHandle>,
    /// The binding key's label, and its handle once found (and checked) in this session.
    pub(super) binding_label: String,
    pub(super) binding: Option<ObjectHandle>,
    /// The last KEK version that may hold `AesKwV2` blobs ([`token::legacy_until`]).
    pub(super) legacy_until: u32,
    pub(super) known: Option<Arc<WorkerPool>>,
    /// Hsm residency: this session's DEK objects. They die with the session, so a new
    /// session starts with an empty map.
    pub(super) resident: ResidentObjects,
}

/// A bounded map of DEK session objects, least recently used destroyed first.
pub(super) struct ResidentObjects {
    cap: usize,
    tick: u64,
    by_key: HashMap<KeyId, (ObjectHandle, u64)>,
    by_use: std::collections::BTreeMap<u64, KeyId>,
}

impl ResidentObjects {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            tick: 0,
            by_key: HashMap::new(),
            by_use: std::collections::BTreeMap::new(),
        }
    }

    pub(super) fn get(&mut self, key_id: &KeyId) -> Option<ObjectHandle> {
        self.tick += 1;
        let tick = self.tick;
        let (h, used) = self.by_key.get_mut(key_id)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, key_id.clone());
        Some(*h)
    }

    /// Adds `h`; returns the handles that must be destroyed (one evicted to stay within the
    /// bound, or an older object of the same key).
    pub(super) fn insert(&mut self, key_id: KeyId, h: ObjectHandle) -> Vec<ObjectHandle> {
        let mut out = self.remove(&key_id).into_iter().collect::<Vec<_>>();
        while self.by_key.len() >= self.cap {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.by_key.remove(&oldest) {
                out.push(old);
            }
        }
        self.tick += 1;
        self.by_use.insert(self.tick, key_id.clone());
        self.by_key.insert(key_id, (h, self.tick));
        out
    }

    pub(super) fn remove(&mut self, key_id: &KeyId) -> Option<ObjectHandle> {
        let (h, used) = self.by_key.remove(key_id)?;
        self.by_use.remove(&used);
        Some(h)
    }

    /// Takes every handle out of the map, for the caller to destroy.
    pub(super) fn drain(&mut self) -> Vec<ObjectHandle> {
        self.by_use.clear();
        self.by_key.drain().map(|(_, (h, _))| h).collect()
    }
}

impl Live {
    /// The handle and class of `kek`, found (and its attributes checked) once per session.
    pub(super) fn kek(&mut self, kek: &KekRef) -> Result<(ObjectHandle, KekClass), OpError> {
        if self
            .known
            .as_ref()
            .is_some_and(|pool| pool.is_destroyed(kek.version))
        {
            self.keks.remove(kek);
            return Err(OpError::Backend(BackendError::KekNotFound {
                id: kek.id.clone(),
                version: kek.version,
            }));
        }
        if let Some(h) = self.keks.get(kek) {
            return Ok(*h);
        }
        let h = token::find_kek(&self.session, kek)?;
        self.keks.insert(kek.clone(), h);
        if let Some(pool) = &self.known {
            pool.known_keks
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(kek.clone());
        }
        Ok(h)
    }

    /// The handle of `kek`, which must be of class `class` (a blob whose format names the
    /// other class was forged or damaged: `InvalidWrapped`).
    pub(super) fn kek_of(
        &mut self,
        kek: &KekRef,
        class: KekClass,
    ) -> Result<ObjectHandle, OpError> {
        match self.kek(kek)? {
            (h, c) if c == class => Ok(h),
            _ => Err(OpError::Backend(BackendError::InvalidWrapped)),
        }
    }

    /// The binding key's handle, found (and checked) once per session.
    pub(super) fn binding_key(&mut self) -> Result<ObjectHandle, OpError> {
        if let Some(h) = self.binding {
            return Ok(h);
        }
        let h = token::find_hmac_key(&self.session, HmacRole::Binding, &self.binding_label)?;
        self.binding = Some(h);
        Ok(h)
    }

    /// Keeps `h` as `key_id`'s DEK object, destroying what that pushes out.
    pub(super) fn keep_resident(&mut self, key_id: &KeyId, h: ObjectHandle) {
        for old in self.resident.insert(key_id.clone(), h) {
            if let Err(e) = self.session.destroy_object(old) {
                tracing::debug!(error = %e, "destroying an evicted DEK session object");
            }
        }
    }
}
