//! Where a PostgreSQL store is and how to reach it (`store.backend = "postgres"`, the KMS's
//! key store and the server's message store alike): the connection string (never a
//! password), the password file, the CA that verifies the database's certificate, the pool
//! and timeouts. Each binary's configuration builds it from its file; its store connects with
//! it ([`super::open_pool`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::secret_file;

/// A connection setting that cannot be used: the configuration key at fault and why.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidPostgresConfig {
    pub key: &'static str,
    pub reason: String,
}

fn invalid(key: &'static str, reason: impl ToString) -> InvalidPostgresConfig {
    InvalidPostgresConfig {
        key,
        reason: reason.to_string(),
    }
}

/// Environment variable that may hold the database password instead of
/// `store.password_file` (libpq's own name for it).
pub const PG_PASSWORD_ENV: &str = "PGPASSWORD";

/// `store.backend = "postgres"`: where the database is and how to reach it. Holds no
/// password: [`PostgresConfig::pg_config`] reads it when connecting.
#[derive(Clone)]
pub struct PostgresConfig {
    /// The libpq connection string (`postgresql://user@host/db?...` or `host=... dbname=...`),
    /// checked to hold no password.
    url: String,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    /// Connecting, waiting for a pooled connection, and each statement (`statement_timeout`).
    pub timeout: Duration,
    /// How often the change feed is polled; a change made by another process stops being
    /// served from this one's cache within twice this.
    pub coherence: Duration,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("target", &self.display_target())
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Every TCP host (and `hostaddr`) of `c` is a loopback address (`localhost`, 127.0.0.0/8,
/// `::1`); Unix-socket hosts are local by nature.
fn only_loopback(c: &tokio_postgres::Config) -> bool {
    let host_ok = |h: &tokio_postgres::config::Host| match h {
        tokio_postgres::config::Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    };
    c.get_hosts().iter().all(host_ok) && c.get_hostaddrs().iter().all(|a| a.is_loopback())
}

impl PostgresConfig {
    /// Checks `url` parses and holds no password; `tcp` hosts need `ca_file`, unless every
    /// one is a loopback address and the URL says `sslmode=disable` (plain text is never
    /// accepted across a network).
    ///
    /// # Errors
    /// [`InvalidPostgresConfig`] naming `store.url` or `store.ca_file`.
    pub fn new(
        url: String,
        password_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
        pool_size: usize,
        timeout: Duration,
        coherence: Duration,
    ) -> Result<Self, InvalidPostgresConfig> {
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| invalid("store.url", format!("not a libpq connection string: {e}")))?;
        if parsed.get_password().is_some() {
            return Err(invalid(
                "store.url",
                "must not hold a password: use store.password_file (mode 0600) or PGPASSWORD",
            ));
        }
        if parsed.get_hosts().is_empty() {
            return Err(invalid("store.url", "names no host"));
        }
        let tcp = parsed
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
        if tcp && ca_file.is_none() {
            if parsed.get_ssl_mode() != tokio_postgres::config::SslMode::Disable {
                return Err(invalid(
                    "store.ca_file",
                    "is required to verify the database's TLS certificate (or, for a database on this host only, put sslmode=disable in store.url)",
                ));
            }
            if !only_loopback(&parsed) {
                return Err(invalid(
                    "store.url",
                    "says sslmode=disable for a database that is not on this host: key records and audit entries would cross the network in plain text; set store.ca_file for TLS",
                ));
            }
        }
        Ok(Self {
            url,
            password_file,
            ca_file,
            pool_size,
            timeout,
            coherence,
        })
    }

    /// The database as logs and errors name it: user, hosts and database, no password.
    pub fn display_target(&self) -> String {
        match self.url.parse::<tokio_postgres::Config>() {
            Ok(c) => {
                let hosts: Vec<String> = c
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(t) => t.clone(),
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .collect();
                format!(
                    "postgres://{}@{}/{}",
                    c.get_user().unwrap_or(""),
                    hosts.join(","),
                    c.get_dbname().unwrap_or("")
                )
            }
            Err(_) => "postgres".into(),
        }
    }

    /// The connection settings, with the password read now (from `store.password_file`, or
    /// `PGPASSWORD`), the timeouts applied, and `app` as the application name the database
    /// shows (unless the URL names one).
    ///
    /// # Errors
    /// One line naming what is wrong (never the password).
    pub fn pg_config(&self, app: &str) -> Result<tokio_postgres::Config, String> {
        use secrecy::ExposeSecret as _;
        let mut c: tokio_postgres::Config =
            self.url.parse().map_err(|e| format!("store.url: {e}"))?;
        match &self.password_file {
            Some(f) => {
                let pw = secret_file::read_secret_string(f)
                    .map_err(|e| format!("store.password_file: {e}"))?;
                c.password(pw.expose_secret().as_bytes());
            }
            None => {
                if let Ok(pw) = std::env::var(PG_PASSWORD_ENV) {
                    let pw = zeroize::Zeroizing::new(pw);
                    c.password(pw.as_bytes());
                }
            }
        }
        // With a CA to verify the server by, TLS is required over TCP: libpq's default
        // (`prefer`) would fall back to plain text when the server offers no TLS.
        let tcp = c
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
        if tcp
            && self.ca_file.is_some()
            && c.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer
        {
            c.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        c.connect_timeout(self.timeout);
        // A peer that vanished (host lost, partition) is noticed within about 20 s on both
        // ends, not after the kernel's two hours: here by TCP keepalives and the user
        // timeout, at the server by its own keepalive settings (which also let go of a dead
        // server's locks). Unix sockets ignore them.
        c.keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(2)
            .tcp_user_timeout(Duration::from_secs(20));
        let ours = format!(
            "-c statement_timeout={} -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=2",
            self.timeout.as_millis()
        );
        // Added to the URL's own `options`, never in place of them.
        let options = match c.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {ours}"),
            _ => ours,
        };
        c.options(options);
        if c.get_application_name().is_none() {
            c.application_name(app);
        }
        Ok(c)
    }

    /// The TLS client settings: roots from `store.ca_file`, none without it (then TLS is
    /// only used where the URL allows none: Unix sockets or `sslmode=disable`).
    ///
    /// # Errors
    /// One line naming the CA file and what is wrong with it.
    pub fn tls_client_config(&self) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(f) = &self.ca_file {
            let pem =
                std::fs::read(f).map_err(|e| format!("store.ca_file {}: {e}", f.display()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("store.ca_file {}: {e}", f.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("store.ca_file {}: {e}", f.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!(
                    "store.ca_file {}: no certificate in it",
                    f.display()
                ));
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}
