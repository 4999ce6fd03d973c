//! The schema: versioned migrations applied once, in one transaction, under an advisory lock
//! (so replicas starting together apply them once), and a read-only probe of the version.

use super::StoreError;
use super::*;

/// Advisory-lock key that serialises migrations across replicas ("pdbkms" in ASCII).
pub(super) const MIGRATION_LOCK: i64 = 0x7064_626b_6d73;

/// The schema, one migration per version, applied in order and never edited once released.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "key records, KEK versions, jobs, audit log",
        r#"
CREATE TABLE kms_key_records (
    key_id   text COLLATE "C" PRIMARY KEY,
    revision bigint NOT NULL,
    record   bytea NOT NULL
);
CREATE TABLE kms_kek_versions (
    version integer PRIMARY KEY,
    record  bytea NOT NULL
);
CREATE TABLE kms_jobs (
    id     text PRIMARY KEY,
    record bytea NOT NULL
);
CREATE TABLE kms_audit (
    seq   bigint PRIMARY KEY,
    entry bytea NOT NULL
);
-- One row, always present: NULL seq and mac while the log is empty, so an append always
-- has a row to lock.
CREATE TABLE kms_audit_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    seq       bigint,
    mac       bytea
);
INSERT INTO kms_audit_head (singleton) VALUES (true);
CREATE TABLE kms_audit_pending (
    key   text COLLATE "C" PRIMARY KEY,
    entry bytea NOT NULL
);
"#,
    ),
    (
        2,
        "change feed for cache coherence across replicas",
        r#"
CREATE TABLE kms_changes (
    seq        bigserial PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('key_destroyed', 'kek_version')),
    subject    text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
    (
        3,
        "leases that coordinate lifecycle work across replicas",
        r#"
CREATE TABLE kms_leases (
    name       text COLLATE "C" PRIMARY KEY,
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);
"#,
    ),
    (
        4,
        "the change feed ordered by transaction, so a change that commits late is still read",
        r#"
ALTER TABLE kms_changes ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX kms_changes_by_xid ON kms_changes (xid, seq);
"#,
    ),
    (
        5,
        "the audit log's anchor, where it begins once a prefix was archived and removed",
        r#"
CREATE TABLE kms_audit_anchor (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    anchor    bytea NOT NULL
);
"#,
    ),
];

/// The newest schema version this binary knows.
pub const SCHEMA_VERSION: i32 = 5;

/// Connects once (on a runtime of its own: `check-config` is synchronous) and reads the
/// schema version (0 before the first start), changing nothing.
///
/// # Errors
/// One line saying what failed, never the password.
pub fn probe(cfg: &PostgresConfig) -> Result<i32, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let pg_config = cfg.pg_config()?;
        let (client, conn) = match &cfg.ca_file {
            Some(_) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(cfg.tls_client_config()?);
                let (client, conn) = pg_config
                    .connect(tls)
                    .await
                    .map_err(|e| db_err(&e).to_string())?;
                (client, tokio::spawn(async move { conn.await.map(|_| ()) }))
            }
            None => {
                let (client, conn) = pg_config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| db_err(&e).to_string())?;
                (client, tokio::spawn(async move { conn.await.map(|_| ()) }))
            }
        };
        let row = client
            .query_one(
                "SELECT CASE WHEN to_regclass('kms_schema_migrations') IS NULL THEN 0 \
                 ELSE (SELECT coalesce(max(version), 0) FROM kms_schema_migrations) END",
                &[],
            )
            .await
            .map_err(|e| db_err(&e).to_string());
        drop(client);
        let _ = conn.await;
        Ok(row?.get::<_, i32>(0))
    })
}

/// Applies every migration newer than the database's schema, in one transaction, under an
/// advisory lock held until it commits.
pub(super) async fn migrate(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(|e| db_err(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db_err(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kms_schema_migrations (
             version     integer PRIMARY KEY,
             description text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| db_err(&e))?;
    let row = tx
        .query_one("SELECT max(version) FROM kms_schema_migrations", &[])
        .await
        .map_err(|e| db_err(&e))?;
    let current: i32 = row.get::<_, Option<i32>>(0).unwrap_or(0);
    let newest = SCHEMA_VERSION;
    if current > newest {
        return Err(StoreError::Io(format!(
            "the database's schema is version {current}, newer than this binary knows ({newest}): \
             upgrade the KMS"
        )));
    }
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await.map_err(|e| db_err(&e))?;
        tx.execute(
            "INSERT INTO kms_schema_migrations (version, description) VALUES ($1, $2)",
            &[version, description],
        )
        .await
        .map_err(|e| db_err(&e))?;
        tracing::info!(version, description, "key store schema migrated");
    }
    tx.commit().await.map_err(|e| db_err(&e))
}
