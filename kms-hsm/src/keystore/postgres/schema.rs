//! The schema: versioned migrations applied once, in one transaction, under an advisory lock
//! (so replicas starting together apply them once), and a read-only probe of the version.

use super::*;

/// Advisory-lock key that serialises migrations across replicas ("pdbkms" in ASCII).
const MIGRATION_LOCK: i64 = 0x7064_626b_6d73;

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

/// The key store's schema: [`MIGRATIONS`] recorded in `kms_schema_migrations`.
pub const SCHEMA: service_kit::postgres::Schema = service_kit::postgres::Schema {
    table: "kms_schema_migrations",
    lock: MIGRATION_LOCK,
    migrations: MIGRATIONS,
    owner: "the KMS",
};

/// Connects once and reads the schema version (0 before the first start), changing nothing.
///
/// # Errors
/// One line saying what failed, never the password.
pub fn probe(cfg: &PostgresConfig) -> Result<i32, String> {
    SCHEMA.probe(cfg, "progressdb-kms")
}
