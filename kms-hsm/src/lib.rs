//! progressdb-kms: the key-management service of progressdb.
//!
//! The KEK lives in an HSM (PKCS#11); the KMS hands out per-thread DEKs, wrapped by the HSM
//! and recorded in its key store (LMDB, or PostgreSQL shared by replicas), and encrypts/decrypts message bodies under them over a
//! small JSON API on a Unix socket or mutual-TLS TCP.
//!
//! Layers, each with its own error type:
//! * [`config`]: TOML file + `PROGRESSDB_KMS__SECTION__KEY` environment overrides.
//! * [`backend`]: the [`backend::KeyBackend`] boundary and its PKCS#11 implementation.
//! * [`keystore`]: durable key records ([`keystore::KeyStore`]; LMDB with group commit, or
//!   PostgreSQL).
//! * [`cache`]: bounded, zeroizing cache of unwrapped DEKs.
//! * [`coherence`]: with replicas, the cache follows the shared store's change feed.
//! * [`service`]: the KMS operations; [`service::ServiceError::code`] maps failures to the
//!   stable wire codes.
//! * [`audit`]: the tamper-evident audit log (entries chained by an HMAC made in the HSM,
//!   appended durably before the action they record).
//! * [`backup`]: backup and restore of the key store (HSM-HMAC-protected file, tombstones
//!   honoured).
//! * [`kek_pin`]: the current KEK version pinned in the key store, not taken on the token's
//!   word.
//! * [`lifecycle`]: KEK rotation with bulk rewrap, verification, KEK destruction, status:
//!   resumable jobs persisted in the key store.
//! * [`http`]: the HTTP API (routing, parsing, error bodies): the client API and, on the
//!   admin endpoint only, the admin API.
//! * [`transport`]: Unix-socket and mutual-TLS listeners, connection limits, graceful shutdown.
//! * [`metrics`]: Prometheus metrics. Logging, config-loading conventions, secret files,
//!   connection admission and the shutdown signal come from the shared `service_kit` crate.
//! * [`app`]: wiring, used by the thin `progressdb-kms` binary.
//! * [`cli`]: the admin subcommands, clients of the running KMS's admin socket.
//! * [`storecopy`]: `store copy`, the offline move of the whole state between backends.

pub mod app;
pub mod audit;
pub mod audit_archive;
pub mod backend;
pub mod cache;
pub mod coherence;
pub mod config;
pub mod http;
pub mod kek_pin;
pub mod keystore;
pub mod lifecycle;
pub mod metrics;
pub mod service;
pub mod tools;
pub mod transport;

pub use app::{Server, StartError};
pub use config::Config;
// The operator tools keep their paths at the crate root.
pub use tools::{backup, check, cli, storecopy};
