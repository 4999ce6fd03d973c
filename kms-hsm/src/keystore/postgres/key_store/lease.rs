//! Leases on the database's clock: taking (or renewing) one in a transaction that locks its
//! row, so replicas' clocks need not agree.

use super::super::{db_err, lease_ms, LeaseOutcome, PostgresStore, StoreError};

impl PostgresStore {
    /// [`KeyStore::acquire_lease`](crate::keystore::KeyStore::acquire_lease).
    pub(super) async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<LeaseOutcome, StoreError> {
        let ttl_ms = lease_ms(ttl)?;
        let mut c = self.client().await?;
        // One transaction; the lease row is locked while the outcome is decided. The
        // database's clock decides expiry, so replicas' clocks need not agree.
        let tx = c.transaction().await.map_err(|e| db_err(&e))?;
        let row = tx
            .query_opt(
                "SELECT holder, expires_at > clock_timestamp() FROM kms_leases \
                 WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await
            .map_err(|e| db_err(&e))?;
        let outcome = match row {
            Some(r) => {
                let (current, live): (String, bool) = (r.get(0), r.get(1));
                if live && current != holder {
                    return Ok(LeaseOutcome::HeldBy(current));
                }
                tx.execute(
                    "UPDATE kms_leases SET holder = $2, \
                     expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond' \
                     WHERE name = $1",
                    &[&name, &holder, &ttl_ms],
                )
                .await
                .map_err(|e| db_err(&e))?;
                if live {
                    LeaseOutcome::Renewed
                } else {
                    LeaseOutcome::Acquired
                }
            }
            None => {
                let n = tx
                    .execute(
                        "INSERT INTO kms_leases (name, holder, expires_at) VALUES \
                         ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond') \
                         ON CONFLICT (name) DO NOTHING",
                        &[&name, &holder, &ttl_ms],
                    )
                    .await
                    .map_err(|e| db_err(&e))?;
                if n == 0 {
                    // Another replica inserted it first: its lease is live.
                    return Ok(LeaseOutcome::HeldBy(String::new()));
                }
                LeaseOutcome::Acquired
            }
        };
        tx.commit().await.map_err(|e| db_err(&e))?;
        Ok(outcome)
    }
}
