//! API keys, roles and user signatures.
//!
//! * Keys come from `auth.keys_file`, a mode-0600 TOML file:
//!   `admin = [..]`, `backend = [..]`, `frontend = [..]`, `signing_secret = ".."`.
//! * `Authorization: Bearer <key>` (or `X-API-Key: <key>`, as ProgressDB's clients send it)
//!   selects the [`Role`]. Only SHA-256 digests of the keys are
//!   kept, and a presented key is compared against **every** configured digest in constant
//!   time (`subtle`), so timing reveals neither which key matched nor how much of it.
//! * Frontend requests must carry `X-User-ID` and `X-User-Signature`, verified in constant
//!   time against every configured signing secret (so a secret can be rotated without
//!   downtime: list the new one first, keep the old one until its signatures are gone). Two
//!   forms are accepted:
//!   * plain: the hex HMAC-SHA256 of the user id (never expires); refused when
//!     `auth.require_expiring_signatures` is on, and for a user whose signatures were revoked;
//!   * expiring: `v2.<expires_unix_secs>.<hex HMAC-SHA256 of
//!     "progressdb-user-sig:v2" 0x00 <user id> 0x00 <expires_unix_secs>
//!     [0x00 <generation>]>`, refused after the expiry time and when the expiry is further
//!     away than `auth.max_signature_ttl_secs` (a signature made under a longer cap, or by a
//!     leaked secret for years ahead, is not honoured). `<generation>` (decimal) is the user's
//!     revocation count, present once it is not 0: revoking a user's signatures
//!     ([`SignatureGenerations`]) makes every signature made before invalid at once.
//!
//!   The first secret signs (`POST /v1/sign`). Backend and admin requests may act for a user
//!   with `X-User-ID` alone.

mod keys_file;
mod signature;
pub use keys_file::*;
pub use signature::*;
use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde::Deserialize;
use service_kit::secret_file::{self, SecretFileError};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use zeroize::{Zeroize, Zeroizing};

use crate::ids::UserId;

pub const HEADER_USER_ID: &str = "x-user-id";
pub const HEADER_USER_SIGNATURE: &str = "x-user-signature";
pub const HEADER_API_KEY: &str = "x-api-key";

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including `/admin/*` and the `kms` fields of threads.
    Admin,
    /// A trusted application backend: any thread, may act for any user, may sign user ids.
    Backend,
    /// An end-user client: only its signed user's own threads.
    Frontend,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Admin => 1,
            Role::Backend => 2,
            Role::Frontend => 3,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Role::Admin),
            2 => Some(Role::Backend),
            3 => Some(Role::Frontend),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Backend => "backend",
            Role::Frontend => "frontend",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    /// The user acted for: always present for [`Role::Frontend`] (signed), optional otherwise.
    pub user: Option<UserId>,
    /// Which configured API key was presented (what rate limits count against).
    pub key: ApiKeyId,
}

/// A configured API key, by its position in the keys file: an identity that is not secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiKeyId(u32);

impl Principal {
    /// This caller narrowed to `user`: it may see and change only `user`'s threads and
    /// messages, exactly as `user` signed in with a frontend key (ProgressDB's rule for a
    /// backend key acting for a user). The API key, which rates count against, stays.
    #[must_use]
    pub fn scoped_to(self, user: UserId) -> Principal {
        Principal {
            role: Role::Frontend,
            user: Some(user),
            key: self.key,
        }
    }

    /// Whether this caller may see `author`'s thread: frontends only their own, backend and
    /// admin any.
    pub fn may_access(&self, author: &UserId) -> bool {
        match self.role {
            Role::Admin | Role::Backend => true,
            Role::Frontend => self.user.as_ref() == Some(author),
        }
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer API key")]
    MissingKey,
    #[error("unknown API key")]
    UnknownKey,
    #[error("frontend request without X-User-ID / X-User-Signature")]
    MissingUser,
    #[error("wrong user signature")]
    BadSignature,
    #[error("invalid X-User-ID")]
    BadUserId,
}

/// Seconds since the Unix epoch (0 before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

impl ApiKeys {
    /// Reads and checks the keys file (mode 0600 or stricter).
    ///
    /// # Errors
    /// [`KeysFileError`] naming the file: too open, unreadable, not TOML of the documented
    /// shape, an empty key or secret, or one key listed under two roles.
    pub fn load(path: &Path) -> Result<Self, KeysFileError> {
        let bytes = secret_file::read_secret_bytes(path)?;
        let invalid = |message: String| KeysFileError::Invalid {
            path: path.to_owned(),
            message,
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8".into()))?;
        // The TOML error can quote the offending value, which could be a key or a secret
        // (`signing_secrets = "s3cret"`): say only where, never what.
        let file: KeysFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!(" at line {line}")
                })
                .unwrap_or_default();
            invalid(format!(
                "not a valid keys file{at}: expected admin, backend, frontend as lists of \
                 strings and signing_secret (a string) or signing_secrets (a list of strings)"
            ))
        })?;
        let admin: Vec<&str> = file.admin.iter().map(String::as_str).collect();
        let backend: Vec<&str> = file.backend.iter().map(String::as_str).collect();
        let frontend: Vec<&str> = file.frontend.iter().map(String::as_str).collect();
        let secrets: Vec<&[u8]> = match (&file.signing_secret, file.signing_secrets.as_slice()) {
            (Some(_), [_, ..]) => {
                return Err(invalid(
                    "set signing_secret or signing_secrets (a list, newest first), not both".into(),
                ))
            }
            (Some(one), []) => vec![one.as_bytes()],
            (None, many) => many.iter().map(String::as_bytes).collect(),
        };
        Self::with_secrets(&admin, &backend, &frontend, &secrets).map_err(invalid)
    }

    /// Builds the key set from its parts.
    ///
    /// # Errors
    /// A message (without key material) when a key or the secret is empty, or a key is listed
    /// twice.
    pub fn from_parts(
        admin: &[&str],
        backend: &[&str],
        frontend: &[&str],
        signing_secret: &[u8],
    ) -> Result<Self, String> {
        Self::with_secrets(admin, backend, frontend, &[signing_secret])
    }

    /// Like [`ApiKeys::from_parts`] with several signing secrets, newest (the one that signs)
    /// first.
    ///
    /// # Errors
    /// As [`ApiKeys::from_parts`]; also when no secret is given or one is listed twice.
    pub fn with_secrets(
        admin: &[&str],
        backend: &[&str],
        frontend: &[&str],
        signing_secrets: &[&[u8]],
    ) -> Result<Self, String> {
        if signing_secrets.is_empty() {
            return Err("signing_secret (or signing_secrets) is required".into());
        }
        for (i, s) in signing_secrets.iter().enumerate() {
            if s.is_empty() {
                return Err(format!("signing secret #{} must not be empty", i + 1));
            }
            if signing_secrets[..i].contains(s) {
                return Err(format!(
                    "signing secret #{} is listed more than once",
                    i + 1
                ));
            }
        }
        let mut entries = Vec::new();
        for (role, keys) in [
            (Role::Admin, admin),
            (Role::Backend, backend),
            (Role::Frontend, frontend),
        ] {
            for (i, k) in keys.iter().enumerate() {
                let k = k.trim();
                if k.is_empty() {
                    return Err(format!("{} key #{} is empty", role.as_str(), i + 1));
                }
                let d = digest(k.as_bytes());
                if entries.iter().any(|e: &KeyEntry| e.digest == d) {
                    return Err(format!(
                        "{} key #{} is listed more than once",
                        role.as_str(),
                        i + 1
                    ));
                }
                entries.push(KeyEntry { digest: d, role });
            }
        }
        if entries.is_empty() {
            return Err("no API keys configured".into());
        }
        Ok(Self {
            entries,
            signing_secrets: signing_secrets
                .iter()
                .map(|s| Zeroizing::new(s.to_vec()))
                .collect(),
            policy: SignaturePolicy::default(),
        })
    }

    /// These keys with `policy` for user signatures.
    #[must_use]
    pub fn with_policy(mut self, policy: SignaturePolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> SignaturePolicy {
        self.policy
    }

    /// The role of `key`, comparing against every configured key in constant time.
    pub fn role_of(&self, key: &[u8]) -> Option<Role> {
        self.lookup(key).map(|(role, _)| role)
    }

    /// The role and identity of `key`, comparing against every entry in constant time.
    fn lookup(&self, key: &[u8]) -> Option<(Role, ApiKeyId)> {
        let d = digest(key);
        let mut role = 0u8;
        let mut index = 0u32;
        for (i, e) in self.entries.iter().enumerate() {
            let eq = d[..].ct_eq(&e.digest[..]);
            role.conditional_assign(&e.role.to_u8(), eq);
            index.conditional_assign(&u32::try_from(i).unwrap_or(u32::MAX), eq);
        }
        Role::from_u8(role).map(|r| (r, ApiKeyId(index)))
    }

    fn mac(secret: &[u8]) -> Hmac<Sha256> {
        // Invariant: HMAC accepts keys of any length, so `new_from_slice` never fails.
        Hmac::<Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }

    /// The signing secret: the first configured one. `with_secrets` refuses an empty list.
    fn signing_secret(&self) -> &[u8] {
        self.signing_secrets.first().map_or(&[], |s| s.as_slice())
    }

    fn plain_tag(secret: &[u8], user: &UserId) -> [u8; 32] {
        let mut m = Self::mac(secret);
        m.update(user.as_str().as_bytes());
        m.finalize().into_bytes().into()
    }

    fn v2_tag(
        secret: &[u8],
        user: &UserId,
        expires: u64,
        generation: SignatureGeneration,
    ) -> [u8; 32] {
        let mut m = Self::mac(secret);
        m.update(SIG_V2_TAG);
        m.update(&[0]);
        m.update(user.as_str().as_bytes());
        m.update(&[0]);
        m.update(expires.to_string().as_bytes());
        // Generation 0 adds nothing, so signatures made before revocations existed stay valid.
        if generation.0 > 0 {
            m.update(&[0]);
            m.update(generation.0.to_string().as_bytes());
        }
        m.finalize().into_bytes().into()
    }

    /// The plain (non-expiring) signature of `user`: lowercase hex HMAC-SHA256 of its id under
    /// the signing secret. Whether it is accepted is the policy's and the user's generation's
    /// matter ([`ApiKeys::verify_at`]).
    pub fn sign(&self, user: &UserId) -> String {
        hex::encode(Self::plain_tag(self.signing_secret(), user))
    }

    /// An expiring signature of `user` at `generation`, valid until `expires` (unix seconds).
    pub fn sign_until(
        &self,
        user: &UserId,
        expires: u64,
        generation: SignatureGeneration,
    ) -> String {
        format!(
            "{SIG_V2_PREFIX}{expires}.{}",
            hex::encode(Self::v2_tag(
                self.signing_secret(),
                user,
                expires,
                generation
            ))
        )
    }

    /// The signature `POST /v1/sign` hands out for `user` at `generation`: expiring after
    /// `ttl` seconds, or after the policy's cap when no `ttl` is asked for and only expiring
    /// signatures are accepted (or the user's signatures were revoked); plain otherwise.
    /// Returns the signature and its expiry.
    ///
    /// # Errors
    /// A message naming the allowed range when `ttl` is 0 or over the cap.
    pub fn sign_for(
        &self,
        user: &UserId,
        ttl: Option<u64>,
        generation: SignatureGeneration,
        now: u64,
    ) -> Result<(String, Option<u64>), String> {
        let cap = self.policy.max_ttl_secs;
        let ttl = match ttl {
            Some(t) if (1..=cap).contains(&t) => t,
            Some(_) => {
                return Err(format!(
                    "expires_in_secs must be 1 to {cap} (auth.max_signature_ttl_secs)"
                ))
            }
            None if self.policy.forms == SignatureForms::PlainAndExpiring && generation.0 == 0 => {
                return Ok((self.sign(user), None));
            }
            None => cap,
        };
        let expires = now.saturating_add(ttl);
        Ok((self.sign_until(user, expires, generation), Some(expires)))
    }

    /// Whether `sig` is a valid signature of `user` at `generation` under any configured
    /// secret, at the current time, under the policy.
    pub fn verify(&self, user: &UserId, sig: &str, generation: SignatureGeneration) -> bool {
        self.verify_at(user, sig, unix_now(), generation)
    }

    /// [`ApiKeys::verify`] with the clock reading `now` (unix seconds). Every secret is tried
    /// (no early exit) and each comparison is constant-time. A plain signature is accepted
    /// only when the policy allows it and the user is at generation 0; an expiring one only
    /// until its expiry, and only when that is at most the TTL cap (plus a minute of clock
    /// skew) away.
    pub fn verify_at(
        &self,
        user: &UserId,
        sig: &str,
        now: u64,
        generation: SignatureGeneration,
    ) -> bool {
        let sig = sig.trim();
        let (expires, hex_tag) = match sig.strip_prefix(SIG_V2_PREFIX) {
            Some(rest) => match rest.split_once('.') {
                Some((exp, tag)) if !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit()) => {
                    match exp.parse::<u64>() {
                        // The canonical decimal form only, so one signature has one spelling.
                        Ok(e) if e.to_string() == exp => (Some(e), tag),
                        _ => return false,
                    }
                }
                _ => return false,
            },
            None => (None, sig),
        };
        let Ok(presented) = hex::decode(hex_tag) else {
            return false;
        };
        if presented.len() != 32 {
            return false;
        }
        let mut ok = subtle::Choice::from(0u8);
        for secret in &self.signing_secrets {
            let expected = match expires {
                None => Self::plain_tag(secret, user),
                Some(e) => Self::v2_tag(secret, user, e, generation),
            };
            ok |= expected[..].ct_eq(&presented[..]);
        }
        let allowed = match expires {
            None => self.policy.forms == SignatureForms::PlainAndExpiring && generation.0 == 0,
            Some(e) => {
                now <= e
                    && e <= now
                        .saturating_add(self.policy.max_ttl_secs)
                        .saturating_add(CLOCK_SKEW_SECS)
            }
        };
        bool::from(ok) && allowed
    }

    /// Authenticates a request from its headers; `generations` says each user's signature
    /// generation.
    ///
    /// # Errors
    /// [`AuthError`]: no/unknown key, a frontend request without a valid user signature, or a
    /// malformed `X-User-ID`.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        generations: &SignatureGenerations,
    ) -> Result<Principal, AuthError> {
        let key = presented_key(headers)?;
        let (role, id) = self.lookup(key.as_bytes()).ok_or(AuthError::UnknownKey)?;
        let user = match headers.get(HEADER_USER_ID) {
            None => None,
            Some(v) => {
                // UTF-8 bytes (an identity provider's id may be non-ASCII).
                let s = std::str::from_utf8(v.as_bytes()).map_err(|_| AuthError::BadUserId)?;
                Some(UserId::parse(s).map_err(|_| AuthError::BadUserId)?)
            }
        };
        if role == Role::Frontend {
            let user = user.as_ref().ok_or(AuthError::MissingUser)?;
            let sig = headers
                .get(HEADER_USER_SIGNATURE)
                .and_then(|v| v.to_str().ok())
                .ok_or(AuthError::MissingUser)?;
            if !self.verify(user, sig, generations.of(user)) {
                return Err(AuthError::BadSignature);
            }
        }
        Ok(Principal {
            role,
            user,
            key: id,
        })
    }
}

/// The API key of a request: `Authorization: Bearer <key>`, or `X-API-Key: <key>` (as
/// ProgressDB's clients send it). Both at once must agree: two different keys are refused
/// rather than one picked.
fn presented_key(headers: &HeaderMap) -> Result<&str, AuthError> {
    let api_key = match headers.get(HEADER_API_KEY) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .ok_or(AuthError::UnknownKey)?,
        ),
    };
    match (bearer(headers), api_key) {
        (Some(b), Some(k)) if b != k => Err(AuthError::UnknownKey),
        (Some(k), _) | (None, Some(k)) => Ok(k),
        (None, None) => Err(AuthError::MissingKey),
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests;
