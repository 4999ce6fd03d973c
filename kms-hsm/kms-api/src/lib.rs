//! Shared vocabulary of the progressdb KMS and its callers.
//!
//! * [`admin`]: the admin API's bodies (KEK rotation, lifecycle jobs, status), served only on
//!   the admin endpoint.
//! * [`ids`]: newtypes for identifiers and key material that cross the wire
//!   (`ThreadId`, `KeyId`, `KekId`, `KekVersion`, `WrappedDek`), parsed once at the edge.
//! * [`parse`]: reading request bodies on the KMS side: JSON into their written form, then
//!   into the typed [`wire`] requests, each failure with its own stable code.
//! * [`wire`]: the JSON request/response bodies of the KMS HTTP API and its stable error codes
//!   (one exhaustive mapping from [`wire::ErrorCode`] to HTTP status).
//! * [`client`]: an HTTP client for the KMS over a Unix socket or HTTPS with mutual TLS, with
//!   connection reuse, timeouts and bounded retries of safe calls.
//! * [`tls`]: rustls configurations from PEM files (private keys through
//!   [`service_kit::secret_file`], so a group/world-readable key file is refused).
//!
//! Nothing in this crate ever prints key material: every type that holds secret or wrapped
//! bytes has a redacting `Debug` and no `Display`.

pub mod admin;
pub mod b64;
pub mod client;
pub mod ids;
pub mod parse;
pub mod tls;
pub mod wire;

/// The start of every AAD the KMS uses for its own bindings (wrapped-DEK checks, probes).
/// Refused at the start of a client's AAD on every encrypt and decrypt call, so no client can
/// make the KMS compute one of them for it.
pub const RESERVED_AAD_PREFIX: &[u8] = b"progressdb-kms:";

pub use client::{ClientError, Endpoint, KmsClient, KmsClientConfig};
pub use ids::{IdError, IdempotencyKey, KekId, KekVersion, KeyId, ThreadId, WrappedDek};
pub use wire::{ErrorBody, ErrorCode, ErrorDetail};
