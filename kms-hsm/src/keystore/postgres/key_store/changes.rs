//! The change feed on PostgreSQL: pages of `kms_changes` after a transaction-id horizon, so
//! no change is stepped over whatever order the transactions that made them committed in.

use super::super::{
    db_err, parse_xid, query_changes, read_change, ChangePage, PostgresStore, StoreError,
};

impl PostgresStore {
    /// [`KeyStore::changes_after`](crate::keystore::KeyStore::changes_after).
    pub(super) async fn read_changes(
        &self,
        cursor: Option<u64>,
        limit: usize,
    ) -> Result<ChangePage, StoreError> {
        // Commit-order safe. A `bigserial` is taken when a row is inserted, not when its
        // transaction commits, so a cursor on `seq` would step over a row whose transaction
        // commits after a later one's. The cursor is instead a transaction-id horizon: every
        // change made by a transaction older than it has been delivered. It advances only to
        // the oldest transaction still running (`pg_snapshot_xmin`), below which every
        // transaction has ended and what it committed is visible to this statement. Changes of
        // newer transactions that have already committed are delivered at once as well, and
        // again by the next polls until the horizon passes them (acting on a change twice is
        // harmless: an eviction or a cache clear), so a long transaction elsewhere delays
        // nothing.
        let c = self.client().await?;
        let horizon_row = c
            .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])
            .await
            .map_err(|e| db_err(&e))?;
        let horizon = parse_xid(&horizon_row.get::<_, String>(0), "the snapshot horizon")?;
        let Some(after) = cursor else {
            return Ok(ChangePage {
                cursor: horizon,
                changes: Vec::new(),
                more: false,
            });
        };
        let st = c
            .prepare_cached(
                "SELECT seq, xid::text, kind, subject FROM kms_changes \
                 WHERE xid >= $1::text::xid8 ORDER BY xid, seq LIMIT $2",
            )
            .await
            .map_err(|e| db_err(&e))?;
        let limit = limit.max(1);
        let rows = c
            .query(
                &st,
                &[
                    &after.to_string(),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| db_err(&e))?;
        let mut changes = rows
            .iter()
            .map(read_change)
            .collect::<Result<Vec<_>, _>>()?;
        let (next, more) = if changes.len() < limit {
            // Everything from the cursor on was read.
            (after.max(horizon), false)
        } else {
            // A full page: deliver whole transactions only, so the cursor can pass them.
            let last = changes.last().map_or(after, |c| c.0);
            if changes.iter().any(|c| c.0 < last) {
                changes.retain(|c| c.0 < last);
                let next = after.max(last.min(horizon));
                (next, next > after)
            } else {
                // One transaction filled the page: read all of it.
                changes = query_changes(
                    &c,
                    "SELECT seq, xid::text, kind, subject FROM kms_changes \
                     WHERE xid = $1::text::xid8 ORDER BY seq",
                    last,
                )
                .await?;
                let next = after.max(last.saturating_add(1).min(horizon));
                (next, next > after)
            }
        };
        if next == after && changes.len() >= limit {
            // A full page the cursor cannot pass: at least `limit` committed changes wait
            // above a transaction that is still running. Paging would return this same page
            // forever; read all of them instead (as many as were committed while that
            // transaction ran).
            let changes = query_changes(
                &c,
                "SELECT seq, xid::text, kind, subject FROM kms_changes \
                 WHERE xid >= $1::text::xid8 ORDER BY xid, seq",
                after,
            )
            .await?;
            return Ok(ChangePage {
                cursor: after.max(horizon),
                changes: changes.into_iter().map(|c| c.1).collect(),
                more: false,
            });
        }
        Ok(ChangePage {
            cursor: next,
            changes: changes.into_iter().map(|c| c.1).collect(),
            more,
        })
    }
}
