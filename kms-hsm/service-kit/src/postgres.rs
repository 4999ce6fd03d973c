//! PostgreSQL as both binaries use it (`store.backend = "postgres"`): where the database is
//! ([`PostgresConfig`]), a pool of connections to it over verified TLS or a local socket
//! ([`open_pool`]), the refusal of a server whose commits are not durable
//! ([`require_durable`]), versioned migrations under an advisory lock ([`Schema`]), and an
//! error's text without any parameter value ([`describe`]).

mod connection;

pub use connection::{InvalidPostgresConfig, PostgresConfig, PG_PASSWORD_ENV};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;

/// The text of a database error: the server's message and SQLSTATE, or the chain of causes
/// of a connection failure (e.g. which certificate check failed). Never a parameter value:
/// statements carry records as parameters, and PostgreSQL does not echo them in errors.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
        None => {
            let mut text = format!("postgres: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }
    }
}

/// Whether `e` is the server's `disk_full`.
pub fn is_disk_full(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::DISK_FULL)
}

/// The text of a pool error ([`describe`] for the database's own).
pub fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(b) => describe(b),
        other => format!("postgres pool: {other}"),
    }
}

/// How often the server checks, while it runs a statement of this process, that the
/// process is still there (`client_connection_check_interval`, PostgreSQL 14 and later).
const CLIENT_CHECK_MS: u32 = 250;

/// Makes the server give up a statement of a process that died mid-statement (SIGKILL, host
/// loss) within [`CLIENT_CHECK_MS`]. Without it, a statement waiting for a lock runs on until
/// it gets the lock and only then finds its client gone; meanwhile the uncommitted rows it
/// wrote block whoever took over for seconds. On a server older than 14 the setting does not
/// exist: the connection is used without it.
async fn check_client_connection(
    client: &mut deadpool_postgres::ClientWrapper,
) -> Result<(), deadpool_postgres::HookError> {
    match client
        .batch_execute(&format!(
            "SET client_connection_check_interval = {CLIENT_CHECK_MS}"
        ))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(()),
        Err(e) => Err(deadpool_postgres::HookError::Backend(e)),
    }
}

/// A pool of at most `store.pool_size` connections, each made within `store.timeout_secs`,
/// over TLS verified by `store.ca_file` when there is one (without it the configuration has
/// only Unix sockets or a loopback `sslmode=disable`, checked when it was built). `app` is
/// the application name the database shows. Connects lazily: the first `get` connects.
///
/// # Errors
/// One line naming what is wrong with the settings (never the password).
pub fn open_pool(cfg: &PostgresConfig, app: &str) -> Result<Pool, String> {
    let pg_config = cfg.pg_config(app)?;
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &cfg.ca_file {
        Some(_) => Manager::from_config(
            pg_config,
            tokio_postgres_rustls::MakeRustlsConnect::new(cfg.tls_client_config()?),
            manager_config,
        ),
        None => Manager::from_config(pg_config, tokio_postgres::NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(cfg.timeout))
        .create_timeout(Some(cfg.timeout))
        .recycle_timeout(Some(cfg.timeout))
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move { check_client_connection(client).await })
        }))
        .build()
        .map_err(|e| e.to_string())
}

/// Refuses a server that runs with `fsync` or `synchronous_commit` off, where a commit
/// (and so an acknowledged write) is not durable.
///
/// # Errors
/// One line: the setting that is off, or the database error.
pub async fn require_durable(client: &tokio_postgres::Client) -> Result<(), String> {
    for setting in ["fsync", "synchronous_commit"] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .map_err(|e| describe(&e))?;
        let value: String = row.get(0);
        if value == "off" {
            return Err(format!(
                "the server runs with {setting} = off: a commit would not be durable"
            ));
        }
    }
    Ok(())
}

/// A store's schema: versioned migrations, recorded in a table of their own.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The table that records the applied versions (e.g. `kms_schema_migrations`).
    pub table: &'static str,
    /// The advisory-lock key that serialises migrations of processes starting together.
    pub lock: i64,
    /// One migration per version, `(version, description, sql)`, applied in order and never
    /// edited once released.
    pub migrations: &'static [(i32, &'static str, &'static str)],
    /// Who to upgrade when the database is newer than this binary ("the KMS").
    pub owner: &'static str,
}

impl Schema {
    /// The newest version this binary knows.
    pub fn newest(&self) -> i32 {
        self.migrations.iter().map(|m| m.0).max().unwrap_or(0)
    }

    /// Applies every migration newer than the database's schema, in one transaction, under
    /// the advisory lock held until it commits. A database newer than [`Schema::newest`] is
    /// refused (fail closed).
    ///
    /// # Errors
    /// One line: the database error, or the newer schema.
    pub async fn migrate(&self, client: &mut tokio_postgres::Client) -> Result<(), String> {
        let tx = client.transaction().await.map_err(|e| describe(&e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.lock])
            .await
            .map_err(|e| describe(&e))?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 version     integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             )",
            self.table
        ))
        .await
        .map_err(|e| describe(&e))?;
        let row = tx
            .query_one(&format!("SELECT max(version) FROM {}", self.table), &[])
            .await
            .map_err(|e| describe(&e))?;
        let current: i32 = row.get::<_, Option<i32>>(0).unwrap_or(0);
        let newest = self.newest();
        if current > newest {
            return Err(format!(
                "the database's schema is version {current}, newer than this binary knows ({newest}): upgrade {}",
                self.owner
            ));
        }
        for (version, description, sql) in self.migrations.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await.map_err(|e| describe(&e))?;
            tx.execute(
                &format!(
                    "INSERT INTO {} (version, description) VALUES ($1, $2)",
                    self.table
                ),
                &[version, description],
            )
            .await
            .map_err(|e| describe(&e))?;
            tracing::info!(version, description, table = self.table, "schema migrated");
        }
        tx.commit().await.map_err(|e| describe(&e))
    }

    /// Connects once (on a runtime of its own: `check-config` is synchronous) and reads the
    /// schema version (0 before the first start), changing nothing.
    ///
    /// # Errors
    /// One line saying what failed, never the password.
    pub fn probe(&self, cfg: &PostgresConfig, app: &str) -> Result<i32, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        rt.block_on(async {
            let pool = open_pool(cfg, app)?;
            let client = pool.get().await.map_err(|e| describe_pool(&e))?;
            let row = client
                .query_one(
                    &format!(
                        "SELECT CASE WHEN to_regclass('{t}') IS NULL THEN 0 \
                         ELSE (SELECT coalesce(max(version), 0) FROM {t}) END",
                        t = self.table
                    ),
                    &[],
                )
                .await
                .map_err(|e| describe(&e))?;
            Ok(row.get::<_, i32>(0))
        })
    }
}
