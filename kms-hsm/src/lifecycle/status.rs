//! What `status` reports: KEK versions with their DEK counts (one census of the key
//! records), jobs, the cache, the HSM and the key arena.

use std::collections::{BTreeMap, BTreeSet};

use kms_api::admin::{CacheStatus, HsmStatus, Job, KekVersionStatus, StatusResponse};
use kms_api::{KekVersion, KeyId};

use crate::backend::{parse_wrapped_header, KeyBackend};
use crate::keystore::{KekState, KekVersionRecord, KeyRecord, KeyState, KeyStore, StoreError};

use kms_api::admin::KekVersionState;

use super::*;

impl<B: KeyBackend, S: KeyStore> Lifecycle<B, S> {
    /// KEK versions, DEK counts per version, jobs and the cache, with `hsm` (the backend's
    /// state and counters, which the caller reads from its metrics).
    ///
    /// # Errors
    /// `Backend` when the HSM cannot list its KEK versions; `Store`.
    pub async fn status(&self, hsm: HsmStatus) -> Result<StatusResponse, LifecycleError> {
        let current = self.svc.backend().current_kek();
        let in_hsm: BTreeSet<KekVersion> = self
            .svc
            .backend()
            .kek_versions()
            .await?
            .into_iter()
            .collect();
        let records: BTreeMap<KekVersion, KekVersionRecord> = self
            .svc
            .store()
            .kek_versions()
            .await?
            .into_iter()
            .map(|r| (r.version, r))
            .collect();
        let (per_version, active, destroyed) = self.census().await?;
        let mut versions: BTreeSet<KekVersion> = in_hsm.clone();
        versions.extend(records.keys().copied());
        versions.extend(per_version.keys().copied());
        let versions = versions
            .into_iter()
            .map(|v| KekVersionStatus {
                version: v,
                state: match records.get(&v).map(|r| r.state) {
                    Some(KekState::Retired) => KekVersionState::Retired,
                    Some(KekState::Destroyed) => KekVersionState::Destroyed,
                    Some(KekState::Active) | None => KekVersionState::Active,
                },
                in_hsm: in_hsm.contains(&v),
                deks: per_version.get(&v).copied().unwrap_or(0),
                current: v == current.version,
            })
            .collect();
        let all = self.svc.store().jobs().await?;
        let mut jobs: Vec<Job> = all
            .iter()
            .filter(|j| !j.state.is_final())
            .cloned()
            .collect();
        let mut finished: Vec<Job> = all.into_iter().filter(|j| j.state.is_final()).collect();
        finished.sort_by_key(|j| std::cmp::Reverse((j.finished_at, j.created_at)));
        jobs.extend(finished.into_iter().take(FINISHED_IN_STATUS));
        Ok(StatusResponse {
            kek_id: current.id,
            current_version: current.version,
            versions,
            active_deks: active,
            destroyed_deks: destroyed,
            jobs,
            cache: CacheStatus {
                entries: self.svc.cache().len() as u64,
                max_entries: self.svc.cache().max_entries() as u64,
                ttl_secs: self.svc.cache().ttl().as_secs(),
            },
            hsm,
            key_memory: key_memory(),
            alerts: service_kit::alerts::current(),
        })
    }

    /// Active DEKs per KEK version, active and destroyed totals.
    pub(super) async fn census(&self) -> Result<(BTreeMap<KekVersion, u64>, u64, u64), StoreError> {
        let mut per_version = BTreeMap::new();
        let (mut active, mut destroyed) = (0, 0);
        self.for_each_record(|r| match &r.state {
            KeyState::Active { .. } => {
                active += 1;
                *per_version.entry(record_version(r)).or_insert(0) += 1;
            }
            KeyState::Destroyed { .. } => destroyed += 1,
        })
        .await?;
        Ok((per_version, active, destroyed))
    }

    /// Active records wrapped under `version` (by the record or by the blob's header; a blob
    /// whose header cannot be read counts too: it cannot be shown not to depend on it).
    pub(super) async fn count_dependents(&self, version: KekVersion) -> Result<u64, StoreError> {
        let mut n = 0;
        self.for_each_record(|r| {
            if let KeyState::Active { wrapped } = &r.state {
                let under = match parse_wrapped_header(wrapped) {
                    Ok(h) => h.kek_version == version,
                    Err(_) => true,
                };
                if r.kek_version == version || under {
                    n += 1;
                }
            }
        })
        .await?;
        Ok(n)
    }

    /// Calls `f` on every key record, in key-id order, a page at a time.
    pub(super) async fn for_each_record(
        &self,
        mut f: impl FnMut(&KeyRecord),
    ) -> Result<(), StoreError> {
        let mut after: Option<KeyId> = None;
        loop {
            let page = self.svc.store().list(after.as_ref(), 1024).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key_id.clone());
            page.iter().for_each(&mut f);
        }
        Ok(())
    }
}

/// The key arena of this process, for `status`.
pub(super) fn key_memory() -> kms_api::admin::KeyMemory {
    let m = service_kit::locked::status();
    kms_api::admin::KeyMemory {
        locked: m.locking == service_kit::locked::Locking::Locked,
        slots: m.slots as u64,
        in_use: m.in_use as u64,
        unlocked_keys: m.unlocked_keys,
    }
}

/// The KEK version an active record is under (its blob's header is authoritative).
pub(super) fn record_version(r: &KeyRecord) -> KekVersion {
    match &r.state {
        KeyState::Active { wrapped } => {
            parse_wrapped_header(wrapped).map_or(r.kek_version, |h| h.kek_version)
        }
        KeyState::Destroyed { .. } => r.kek_version,
    }
}
