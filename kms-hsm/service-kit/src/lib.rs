//! What the two progressdb services do alike, written once.
//!
//! * [`alerts`]: process-wide alerts an operator must see (start-up log, `/readyz`, `status`).
//! * [`aead`]: AES-256-GCM under a zeroizing [`aead::DataKey`] (held in [`locked`] memory): the KMS's message
//!   encryption and the dev-only embedded provider of the server.
//! * [`body`]: request bodies read into zeroizing memory (`ZeroizingBuf`) within a deadline.
//! * [`check`]: `check-config`: findings about a config and the files it names, one line each,
//!   and the checks both binaries share (secret files, store and socket directories).
//! * [`config`]: the configuration conventions: one TOML file given with `--config`, every key
//!   overridable from the environment as `<PREFIX>__SECTION__KEY`, every error one line that
//!   names the file or key at fault.
//! * [`telemetry`]: logs to stderr, text or JSON, filtered by `RUST_LOG` or `log.level`.
//! * [`secret_file`]: secrets read from files that must not be group/world accessible.
//! * [`locked`]: the arena of `mlock`ed 32-byte slots every raw key lives in, zeroized and
//!   reused on drop.
//! * [`process`]: no core dumps and a non-dumpable process, set before any secret is read.
//! * [`group_commit`]: the single LMDB writer of both stores: one thread, one transaction and
//!   one fsync per group of concurrent writes, map growth, answers only after the commit.
//! * [`jobs`]: the skeleton of resumable jobs: step errors, retry back-off, and the set of
//!   jobs this process drives.
//! * [`lmdb`]: the one place an LMDB environment is opened, one process per LMDB store (an
//!   exclusive `flock`) and offline compaction (drops free pages, where replaced and deleted
//!   records' bytes linger).
//! * [`metrics`]: the HTTP request metrics (count and latency by route template, method and
//!   status), the stores' commit metrics, and the OpenMetrics encoding of a registry.
//! * [`routes`]: the route template of a request path, from the route table a router is
//!   built from (metric labels, per-route classes).
//! * [`serve`]: the HTTP/1 connection of both services (timeouts, guarded I/O), accept
//!   back-off, and one graceful shutdown.
//! * [`conn`]: connection admission for listeners that refuse to be exhausted: a global cap
//!   and a per-peer cap, and an immediate `503 overloaded` answer instead of a silent stall.
//! * [`guarded_io`]: the I/O of every served connection: a write that makes no progress for
//!   the write timeout ends the connection (a client that never reads its answer), and a
//!   lingering close, so a peer answered before its request was read whole still receives
//!   the answer instead of a reset.
//! * [`rate`]: token-bucket request rate limits per caller (429 with `Retry-After`), with
//!   bounded memory.
//! * [`shutdown`]: one future that completes on SIGTERM or SIGINT, installed before start-up.
//!
//! `progressdb-kms` (`kms-hsm/`) and `progressdb` (`server/`) both use every module.

pub mod aead;
pub mod alerts;
pub mod body;
pub mod check;
pub mod config;
pub mod conn;
pub mod disk;
pub mod group_commit;
pub mod guarded_io;
pub mod jobs;
pub mod lmdb;
pub mod locked;
pub mod metrics;
pub mod new_file;
pub mod postgres;
pub mod process;
pub mod rate;
pub mod routes;
pub mod secret_file;
pub mod serve;
pub mod shutdown;
pub mod store_spec;
pub mod telemetry;
