//! The batch steps of the server's jobs: moving a batch of a thread's messages from its old
//! DEK (or from plain text) to its new one, and verifying a batch under the new DEK.

use super::*;

pub(super) async fn migrate_batch(
    svc: &Arc<MessageService>,
    thread: &ThreadRecord,
    job: &mut JobRecord,
) -> Result<(), Step> {
    let rot = thread
        .rotation
        .as_ref()
        .ok_or_else(|| Step::Fail("no rotation".into()))?;
    let Some(new_key) = thread.kms.clone().map(Arc::new) else {
        return Err(Step::Fail("the thread has no key".into()));
    };
    let provider = svc
        .provider
        .as_ref()
        .ok_or_else(|| Step::Pause("no key provider".into()))?;
    let raw = svc
        .store
        .raw_messages(&thread.id, rot.cursor, rot.start, BATCH)
        .await?;
    let Some(&(scanned_to, _)) = raw.last() else {
        job.state = JobState::Verifying;
        job.updated_at = Timestamp::now();
        svc.store.write(PutJob(job.clone())).await?;
        return Ok(());
    };
    // Parse; decrypt what is sealed under the retiring key, in one batch.
    let mut parsed: Vec<(MessageId, Vec<u8>, Option<MessageRecord>)> = Vec::new();
    let mut to_open: Vec<(usize, DecryptItem)> = Vec::new();
    for (id, bytes) in raw {
        let rec: Option<MessageRecord> = serde_json::from_slice::<MessageRecord>(&bytes)
            .ok()
            .filter(|r| {
                // Re-sealing would bind attributes the old AAD never covered: leave it.
                let bound = r.attrs_bound();
                if !bound {
                    tracing::error!(job = %job.id, message = %id, "record claims a role or reply its format does not bind (edited on disk): left as it is");
                }
                bound
            });
        if let Some(r) = &rec {
            if let (Content::Enc(ct), SealedBy::Key(k)) = (&r.content, thread.sealed_by(id)) {
                to_open.push((
                    parsed.len(),
                    DecryptItem {
                        key: Arc::new(k.clone()),
                        ciphertext: ct.0.clone(),
                        aad: message_aad(r.format, &MessageBinding::of(thread, id, r)),
                    },
                ));
            }
        }
        parsed.push((id, bytes, rec));
    }
    let mut plaintexts: Vec<Option<SecretBytes>> = (0..parsed.len()).map(|_| None).collect();
    if !to_open.is_empty() {
        let (idx, reqs): (Vec<usize>, Vec<DecryptItem>) = to_open.into_iter().unzip();
        let results = one_per_item(provider.decrypt_batch(reqs).await, idx.len())?;
        for (i, r) in idx.into_iter().zip(results) {
            match r {
                Ok(pt) => plaintexts[i] = Some(pt),
                // Only a ciphertext that does not authenticate is left behind (it was
                // unreadable already); any other failure may be the KMS's, and moving past it
                // would lose the message once the old key is destroyed: pause instead.
                Err(ProviderError::DecryptionFailed) => {
                    tracing::warn!(job = %job.id, message = %parsed[i].0, "message did not decrypt before migration; left as it is");
                }
                Err(ProviderError::Unavailable(m)) => return Err(Step::Pause(m)),
                Err(e) => {
                    return Err(Step::Pause(format!(
                        "decrypting message {}: {e}",
                        parsed[i].0
                    )))
                }
            }
        }
    }
    // Encrypt every migratable message under the new key, in one batch.
    let mut to_seal: Vec<(usize, EncryptItem)> = Vec::new();
    for (i, (id, _, rec)) in parsed.iter().enumerate() {
        let Some(rec) = rec else {
            continue;
        };
        let plaintext = match (&rec.content, plaintexts[i].take()) {
            (Content::Enc(_), Some(pt)) => pt,
            (Content::Enc(_), None) => continue,
            // A tombstone has no content to move.
            (Content::Deleted, _) => continue,
            (Content::Plain(v), _) if thread.accepts_plain(*id) => {
                let mut buf = kms_api::wire::to_json_zeroizing(v, 256)
                    .map_err(|_| Step::Fail("cannot encode a plain body".into()))?
                    .into_inner();
                SecretBytes::new(std::mem::take(&mut *buf))
            }
            (Content::Plain(_), _) => {
                tracing::error!(job = %job.id, message = %id, "plain record where the thread allows none: left as it is");
                continue;
            }
        };
        to_seal.push((
            i,
            EncryptItem {
                key: Arc::clone(&new_key),
                plaintext,
                aad: message_aad(RecordFormat::CURRENT, &MessageBinding::of(thread, *id, rec)),
            },
        ));
    }
    let mut sealed: Vec<Option<Vec<u8>>> = (0..parsed.len()).map(|_| None).collect();
    if !to_seal.is_empty() {
        let (idx, reqs): (Vec<usize>, Vec<EncryptItem>) = to_seal.into_iter().unzip();
        let results = one_per_item(provider.encrypt_batch(reqs).await, idx.len())?;
        for (i, r) in idx.into_iter().zip(results) {
            let ct = r.map_err(provider_step)?;
            let (_, _, rec) = &parsed[i];
            let Some(rec) = rec else { continue };
            let mut new = rec.clone();
            new.format = RecordFormat::CURRENT;
            new.content = Content::Enc(Bytes64(ct.0));
            sealed[i] = Some(
                serde_json::to_vec(&new)
                    .map_err(|_| Step::Fail("cannot encode a record".into()))?,
            );
        }
    }
    // Every scanned message goes to the write, migrated or left as it is, so that one changed
    // since it was read stops the cursor before it.
    let mut items: Vec<Migrated> = parsed
        .iter()
        .zip(sealed)
        .map(|((id, bytes, _), new)| Migrated {
            id: *id,
            expected: bytes.clone(),
            new,
        })
        .collect();
    items.sort_by_key(|m| m.id);
    let mut next = job.clone();
    next.updated_at = Timestamp::now();
    let applied = svc
        .store
        .write(MigrateBatch {
            thread: thread.id.clone(),
            job: next.clone(),
            items,
            scanned_to,
        })
        .await?;
    svc.cache.invalidate(&thread.id);
    // What MigrateBatch wrote as the job record.
    if let Some(stored) = svc.store.get_job(&job.id).await? {
        *job = stored;
    } else {
        next.progress.migrated += applied as u64;
        *job = next;
    }
    Ok(())
}

pub(super) async fn verify(
    svc: &Arc<MessageService>,
    thread: &ThreadRecord,
    job: &mut JobRecord,
) -> Result<(), Step> {
    let rot = thread
        .rotation
        .as_ref()
        .ok_or_else(|| Step::Fail("no rotation".into()))?;
    let provider = svc
        .provider
        .as_ref()
        .ok_or_else(|| Step::Pause("no key provider".into()))?;
    let mut after = None;
    let mut verified = 0u64;
    let mut failed = 0u64;
    loop {
        let raw = svc
            .store
            .raw_messages(&thread.id, after, rot.start, BATCH)
            .await?;
        let Some(&(last, _)) = raw.last() else { break };
        after = Some(last);
        let mut reqs = Vec::new();
        for (id, bytes) in &raw {
            let Ok(rec) = serde_json::from_slice::<MessageRecord>(bytes) else {
                failed += 1;
                continue;
            };
            match (&rec.content, thread.sealed_by(*id)) {
                (Content::Enc(ct), SealedBy::Key(k)) => reqs.push(DecryptItem {
                    key: Arc::new(k.clone()),
                    ciphertext: ct.0.clone(),
                    aad: message_aad(rec.format, &MessageBinding::of(thread, *id, &rec)),
                }),
                (Content::Deleted, _) => {}
                _ => failed += 1,
            }
        }
        if reqs.is_empty() {
            continue;
        }
        let n = reqs.len();
        let results = one_per_item(provider.decrypt_batch(reqs).await, n)?;
        for r in results {
            match r {
                Ok(_) => verified += 1,
                Err(ProviderError::Unavailable(m)) => return Err(Step::Pause(m)),
                Err(_) => failed += 1,
            }
        }
    }
    job.progress.verified = verified;
    job.updated_at = Timestamp::now();
    if failed > job.progress.unreadable {
        job.state = JobState::Failed;
        job.finished_at = Some(Timestamp::now());
        job.error = Some(format!(
            "{failed} message(s) do not decrypt under the new key ({} were unreadable before); \
             the old key is kept",
            job.progress.unreadable
        ));
    } else {
        job.state = JobState::DestroyingOld;
    }
    svc.store.write(PutJob(job.clone())).await?;
    Ok(())
}
