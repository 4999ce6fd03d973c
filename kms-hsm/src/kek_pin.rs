//! The current KEK version is pinned in the key store, not taken on the token's word.
//!
//! The PKCS#11 backend makes the highest version labelled `hsm.kek_label` in the token the
//! current KEK, the one every new DEK is wrapped under. Anyone who can write objects in the
//! token (another deployment's KMS on it, an HSM operator, a token copy) could otherwise add a
//! higher version and have this deployment wrap its new DEKs under a key it did not make. A
//! rotation records its target version in the store *before* the HSM makes it
//! ([`crate::lifecycle`]), so a version in the token that is newer than every version the
//! store knows was not made by this deployment: the KMS refuses to start on it.
//!
//! A store with no KEK version records yet (a new deployment, or one made before these
//! records) pins the token's current version at its first start.

use kms_api::KekVersion;

use crate::backend::KekRef;
use crate::keystore::{now_secs, KekState, KekVersionRecord, KeyStore, StoreError};

/// Why the pin check refused to start.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "the token's newest KEK version ({token}) is newer than any the key store knows \
         (newest {known}): it was not made by a rotation of this deployment. Remove that \
         object from the token (label '{label}', CKA_ID {token}), or restore the key store \
         that made it"
    )]
    Unknown {
        label: String,
        token: KekVersion,
        known: KekVersion,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks the backend's current KEK against the versions the store knows, pinning it when
/// the store knows none.
///
/// # Errors
/// `Unknown` when the token's current version is newer than every version in the store;
/// `Store` when the store cannot be read or written.
pub async fn check<S: KeyStore>(store: &S, current: &KekRef) -> Result<(), PinError> {
    let known = store.kek_versions().await?;
    match known.iter().map(|r| r.version).max() {
        None => {
            store
                .put_kek_version(KekVersionRecord {
                    version: current.version,
                    state: KekState::Active,
                    created_at: now_secs(),
                    retired_at: None,
                    destroyed_at: None,
                })
                .await?;
            tracing::info!(kek_version = %current.version, "current KEK version pinned in the key store");
            Ok(())
        }
        Some(newest) if current.version > newest => Err(PinError::Unknown {
            label: current.id.to_string(),
            token: current.version,
            known: newest,
        }),
        Some(newest) if current.version < newest => {
            // A rotation recorded its target and stopped before the HSM made it: the job
            // makes it when it resumes. Until then the older version stays current.
            tracing::warn!(
                kek_version = %current.version,
                recorded = %newest,
                "the key store knows a newer KEK version than the token holds; a rotation that has not made it yet will"
            );
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keystore::lmdb::LmdbStore;
    use crate::metrics::StoreMetrics;
    use kms_api::KekId;

    fn kek(v: u32) -> KekRef {
        KekRef {
            id: KekId::parse("kek").unwrap(),
            version: KekVersion::new(v).unwrap(),
        }
    }

    #[tokio::test]
    async fn pins_at_first_start_then_refuses_a_newer_unknown_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = LmdbStore::open(dir.path(), 8, StoreMetrics::default()).unwrap();
        check(&store, &kek(1)).await.unwrap();
        assert_eq!(store.kek_versions().await.unwrap().len(), 1);
        check(&store, &kek(1)).await.unwrap();
        let err = check(&store, &kek(2)).await.unwrap_err();
        assert!(
            matches!(err, PinError::Unknown { token, known, .. }
                if token.get() == 2 && known.get() == 1),
            "{err}"
        );
        // A rotation's recorded target that the HSM has not made yet is not an error.
        store
            .put_kek_version(KekVersionRecord {
                version: KekVersion::new(3).unwrap(),
                state: KekState::Active,
                created_at: 1,
                retired_at: None,
                destroyed_at: None,
            })
            .await
            .unwrap();
        check(&store, &kek(2)).await.unwrap();
        check(&store, &kek(3)).await.unwrap();
    }
}
