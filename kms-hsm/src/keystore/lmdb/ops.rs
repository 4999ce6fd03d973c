//! What the writer thread does with each queued write, inside its group's transaction: the
//! record writes, the audit append (checked against the head it was chained on), the audit
//! compaction. An LMDB error aborts the whole group; a logical refusal is that write's own
//! answer.

use std::ops::Bound;

use heed::types::{Bytes, Str};
use heed::{Database, RwTxn};
use service_kit::group_commit::{CommitError, Write};

use super::{
    decode_record, encode_record, AuditAnchor, AuditHead, Compacted, DestroyOutcome, KeyRecord,
    KeyState, StoreError,
};

use super::*;

/// The JSON value stored under `key` in `db`: `Ok(None)` when absent, `Corrupt` when it does
/// not decode.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(
    db: Database<Str, Bytes>,
    txn: &heed::RoTxn<'_>,
    key: &str,
    what: &str,
) -> heed::Result<Result<Option<T>, StoreError>> {
    Ok(match db.get(txn, key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(v)
            .map(Some)
            .map_err(|_| StoreError::Corrupt {
                key: key.into(),
                detail: what.into(),
            }),
    })
}

/// [`Op::CompactAudit`], inside the writer's transaction.
pub(super) fn compact(
    wtxn: &mut RwTxn<'_>,
    keys: Database<Str, Bytes>,
    lifecycle: Database<Str, Bytes>,
    audit: Database<Bytes, Bytes>,
    anchor: &AuditAnchor,
    tombstones_through: u64,
) -> heed::Result<Result<OpOutput, StoreError>> {
    let stored: Option<AuditAnchor> =
        match read_json(lifecycle, wtxn, AUDIT_ANCHOR, "undecodable audit anchor")? {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
    let head: Option<AuditHead> =
        match read_json(lifecycle, wtxn, AUDIT_HEAD, "undecodable audit head")? {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
    let seq = anchor.seq.to_be_bytes();
    let ends_at_entry = audit
        .get(wtxn, &seq)?
        .is_some_and(|v| crate::keystore::entry_has_mac(v, &anchor.mac));
    if stored.is_some_and(|a| a.seq >= anchor.seq)
        || head.is_none_or(|h| h.seq < anchor.seq)
        || !ends_at_entry
    {
        return Ok(Err(StoreError::AuditHeadMoved));
    }
    let range = (Bound::<&[u8]>::Unbounded, Bound::Included(&seq[..]));
    let entries = audit.delete_range(wtxn, &range)? as u64;
    let mut doomed = Vec::new();
    for item in keys.iter(wtxn)? {
        let (k, v) = item?;
        // A record that does not decode is left for `verify` to name, never removed.
        if let Ok(KeyRecord {
            state: KeyState::Destroyed { destroyed_at },
            ..
        }) = decode_record(k, v)
        {
            if destroyed_at <= tombstones_through {
                doomed.push(k.to_owned());
            }
        }
    }
    for k in &doomed {
        keys.delete(wtxn, k)?;
    }
    let value = match serde_json::to_vec(anchor) {
        Ok(v) => v,
        Err(e) => {
            return Ok(Err(StoreError::Io(format!(
                "cannot encode the audit anchor: {e}"
            ))))
        }
    };
    lifecycle.put(wtxn, AUDIT_ANCHOR, &value)?;
    Ok(Ok(OpOutput::Compacted(Compacted {
        entries,
        tombstones: doomed.len() as u64,
    })))
}

/// Applies one op inside `wtxn`. `Err` (LMDB) aborts the whole group; logical outcomes
/// (exists, not found, conflict, a corrupt record) are the op's own result in `Ok`.
pub(super) fn apply(
    wtxn: &mut RwTxn<'_>,
    keys: Database<Str, Bytes>,
    lifecycle: Database<Str, Bytes>,
    audit: Database<Bytes, Bytes>,
    op: &Op,
) -> heed::Result<Result<OpOutput, StoreError>> {
    match op {
        Op::AppendAudit {
            entries,
            prev,
            head,
            chained,
            records,
        } => {
            let stored: Option<AuditHead> = match lifecycle.get(wtxn, AUDIT_HEAD)? {
                None => None,
                Some(v) => match serde_json::from_slice(v) {
                    Ok(h) => Some(h),
                    Err(_) => {
                        return Ok(Err(StoreError::Corrupt {
                            key: AUDIT_HEAD.into(),
                            detail: "undecodable audit head".into(),
                        }))
                    }
                },
            };
            if stored != *prev {
                return Ok(Err(StoreError::AuditHeadMoved));
            }
            // A pending entry this group chains that is gone was chained by another group:
            // chaining it again would log the event twice, so nothing is written.
            for k in chained {
                if lifecycle.get(wtxn, k)?.is_none() {
                    return Ok(Err(StoreError::AuditHeadMoved));
                }
            }
            // Validate every record first: all of this or none of it. Two records of the
            // group under one key id (repeats of one idempotent create) are a conflict too.
            let mut encoded = Vec::with_capacity(records.len());
            let mut seen = std::collections::HashSet::with_capacity(records.len());
            for rec in records {
                if !seen.insert(rec.key_id.as_str())
                    || keys.get(wtxn, rec.key_id.as_str())?.is_some()
                {
                    return Ok(Err(StoreError::AlreadyExists(rec.key_id.clone())));
                }
                match encode_record(rec) {
                    Ok(v) => encoded.push((rec.key_id.as_str(), v)),
                    Err(e) => return Ok(Err(e)),
                }
            }
            for (k, v) in encoded {
                keys.put(wtxn, k, &v)?;
            }
            for (seq, value) in entries {
                audit.put(wtxn, &seq.to_be_bytes(), value)?;
            }
            for k in chained {
                lifecycle.delete(wtxn, k)?;
            }
            lifecycle.put(wtxn, AUDIT_HEAD, head)?;
            Ok(Ok(OpOutput::Written))
        }
        Op::PutLifecycle { key, value } => {
            lifecycle.put(wtxn, key, value)?;
            Ok(Ok(OpOutput::Written))
        }
        Op::CompactAudit {
            anchor,
            tombstones_through,
        } => compact(wtxn, keys, lifecycle, audit, anchor, *tombstones_through),
        Op::PutNew(rec) => {
            if keys.get(wtxn, rec.key_id.as_str())?.is_some() {
                return Ok(Err(StoreError::AlreadyExists(rec.key_id.clone())));
            }
            let value = match encode_record(rec) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            keys.put(wtxn, rec.key_id.as_str(), &value)?;
            Ok(Ok(OpOutput::Written))
        }
        Op::CompareAndSwap { expected, new } => {
            let current = match keys.get(wtxn, new.key_id.as_str())? {
                None => return Ok(Err(StoreError::NotFound(new.key_id.clone()))),
                Some(bytes) => match decode_record(new.key_id.as_str(), bytes) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                },
            };
            if current != **expected {
                return Ok(Err(StoreError::Conflict(new.key_id.clone())));
            }
            let value = match encode_record(new) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            keys.put(wtxn, new.key_id.as_str(), &value)?;
            Ok(Ok(OpOutput::Written))
        }
        Op::Destroy { key_id, at } => {
            let current = match keys.get(wtxn, key_id.as_str())? {
                None => return Ok(Ok(OpOutput::Destroy(DestroyOutcome::Unknown))),
                Some(bytes) => match decode_record(key_id.as_str(), bytes) {
                    Ok(r) => r,
                    Err(e) => return Ok(Err(e)),
                },
            };
            if matches!(current.state, KeyState::Destroyed { .. }) {
                return Ok(Ok(OpOutput::Destroy(DestroyOutcome::AlreadyDestroyed)));
            }
            let destroyed = KeyRecord {
                state: KeyState::Destroyed { destroyed_at: *at },
                ..current
            };
            let value = match encode_record(&destroyed) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            keys.put(wtxn, key_id.as_str(), &value)?;
            Ok(Ok(OpOutput::Destroy(DestroyOutcome::Destroyed)))
        }
    }
}

impl Write for Pending {
    fn apply(&mut self, txn: &mut RwTxn<'_>) -> heed::Result<()> {
        self.result = Some(apply(txn, self.keys, self.lifecycle, self.audit, &self.op)?);
        Ok(())
    }

    fn finish(self: Box<Self>, commit: Result<(), CommitError>) {
        let answer = match (commit, self.result) {
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(StoreError::Io("write was not applied".into())),
            (Err(CommitError::MapFull), _) => Err(StoreError::Full {
                limit: format!("store.map_size_mb = {}", self.map_size_mb),
            }),
            (Err(CommitError::NoSpace(m)), _) => Err(StoreError::NoSpace(m)),
            (Err(CommitError::Lmdb(m)), _) => Err(StoreError::Io(m)),
        };
        // The caller may have gone away (request cancelled); its write is durable anyway,
        // which is the safe direction.
        let _ = self.reply.send(answer);
    }
}
