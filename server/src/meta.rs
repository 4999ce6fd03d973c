//! A thread's title, slug and metadata at rest: sealed under the thread's DEK, like its messages.
//!
//! Users put content in titles, so a thread that has a DEK stores `{"title", "metadata"}` as
//! AES-GCM under it ([`SealedMeta`]), bound by its AAD to the thread id, author and creation
//! time ([`thread_meta_aad`]); the record's own `title` is stored empty and its `metadata`
//! absent. The server opens the sealed part whenever it reads a record for an answer (one
//! batch call for a page of threads) and keeps only opened records in its cache.
//!
//! `key_id` names the DEK that sealed it: the thread's key, or during a rotation the
//! retiring one, until the rotation seals it again under the new key before it destroys the
//! old ([`crate::service::jobs`]). A record written before sealing existed (or by a thread that got
//! its DEK later) is plain until its next patch or rotation seals it.

use std::sync::Arc;

use kms_api::wire::{Bytes64, SecretBytes};
use serde::{Deserialize, Serialize};

use crate::provider::{DecryptItem, EncryptItem, KeyProvider, ProviderError, ThreadKey};
use crate::store::aad::thread_meta_aad;
use crate::store::{RawJson, SealedMeta, ThreadRecord};

/// The sealed plaintext.
#[derive(Serialize, Deserialize)]
struct Plain {
    title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slug: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<RawJson>,
}

fn aad(rec: &ThreadRecord) -> Vec<u8> {
    thread_meta_aad(&rec.id, &rec.author, rec.created_at)
}

/// Seals `rec`'s title and metadata under `key` (the thread's current DEK).
///
/// # Errors
/// The provider's, when it cannot encrypt now.
pub async fn seal(
    provider: &dyn KeyProvider,
    key: &ThreadKey,
    rec: &ThreadRecord,
) -> Result<SealedMeta, ProviderError> {
    let plain = serde_json::to_vec(&Plain {
        title: rec.title.clone(),
        slug: rec.slug.clone(),
        metadata: rec.metadata.clone(),
    })
    .map_err(|e| ProviderError::Internal(format!("cannot encode a thread's metadata: {e}")))?;
    let ct = provider
        .encrypt(EncryptItem {
            key: Arc::new(key.clone()),
            plaintext: SecretBytes::new(plain),
            aad: aad(rec),
        })
        .await?;
    Ok(SealedMeta {
        key_id: key.key_id.clone(),
        ct: Bytes64(ct.0),
    })
}

/// `rec` as it is stored once `sealed` holds its title and metadata.
pub fn stored(mut rec: ThreadRecord, sealed: SealedMeta) -> ThreadRecord {
    rec.title.clear();
    rec.slug = None;
    rec.metadata = None;
    rec.sealed_meta = Some(sealed);
    rec
}

/// The DEK that sealed `rec`'s metadata: the thread's key or its rotation's retiring one.
fn sealing_key(rec: &ThreadRecord) -> Option<&ThreadKey> {
    let id = &rec.sealed_meta.as_ref()?.key_id;
    rec.kms
        .iter()
        .chain(rec.rotation.as_ref().and_then(|r| r.retiring.as_ref()))
        .find(|k| &k.key_id == id)
}

/// Opens the sealed title and metadata of every record in `recs` that has them, in one
/// batch call; plain records pass through. Each result is the record with its title and
/// metadata filled in, or why it did not open: `DecryptionFailed` for a sealed part that does
/// not authenticate (moved, edited) or names a key the thread does not have.
///
/// # Errors
/// The whole call, when the provider cannot be reached (or none is configured while a
/// record is sealed).
pub async fn open_all(
    provider: Option<&dyn KeyProvider>,
    recs: Vec<ThreadRecord>,
) -> Result<Vec<Result<ThreadRecord, ProviderError>>, ProviderError> {
    let mut items = Vec::new();
    let mut slots = Vec::with_capacity(recs.len());
    for rec in &recs {
        slots.push(match (&rec.sealed_meta, sealing_key(rec)) {
            (None, _) => Slot::Plain,
            (Some(_), None) => Slot::NoKey,
            (Some(s), Some(k)) => {
                items.push(DecryptItem {
                    key: Arc::new(k.clone()),
                    ciphertext: s.ct.0.clone(),
                    aad: aad(rec),
                });
                Slot::Sealed(items.len() - 1)
            }
        });
    }
    let mut opened = if items.is_empty() {
        Vec::new()
    } else {
        let Some(p) = provider else {
            return Err(ProviderError::Unavailable(
                "a thread's metadata is sealed and no key provider is configured".into(),
            ));
        };
        let n = items.len();
        let out = p.decrypt_batch(items).await?;
        if out.len() != n {
            return Err(ProviderError::Internal(format!(
                "{} results for {n} metadata decryptions",
                out.len()
            )));
        }
        out
    }
    .into_iter()
    .map(Some)
    .collect::<Vec<_>>();
    Ok(recs
        .into_iter()
        .zip(slots)
        .map(|(mut rec, slot)| match slot {
            Slot::Plain => Ok(rec),
            Slot::NoKey => Err(ProviderError::DecryptionFailed),
            Slot::Sealed(i) => {
                let pt = opened
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or(Err(ProviderError::DecryptionFailed))?;
                let plain: Plain = serde_json::from_slice(pt.expose())
                    .map_err(|_| ProviderError::DecryptionFailed)?;
                rec.title = plain.title;
                rec.slug = plain.slug;
                rec.metadata = plain.metadata;
                Ok(rec)
            }
        })
        .collect())
}

/// Opens one record ([`open_all`] of one).
///
/// # Errors
/// As [`open_all`], and the record's own failure.
pub async fn open(
    provider: Option<&dyn KeyProvider>,
    rec: ThreadRecord,
) -> Result<ThreadRecord, ProviderError> {
    open_all(provider, vec![rec])
        .await?
        .pop()
        .unwrap_or(Err(ProviderError::DecryptionFailed))
}

enum Slot {
    Plain,
    NoKey,
    Sealed(usize),
}
