//! Identifier and key-material newtypes. Parse, don't validate: a value of these types is
//! well-formed by construction, so code that holds one never re-checks it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was refused. The message names the rule, never echoes secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must be 1 to {max} characters")]
    Length { kind: &'static str, max: usize },
    #[error("{kind} may contain only ASCII letters, digits, '-' and '_'")]
    Charset { kind: &'static str },
    #[error("key id must look like dek_<32 lowercase hex digits>")]
    KeyIdFormat,
    #[error("kek version must be a positive integer")]
    KekVersion,
}

fn check_token(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError::Length { kind, max });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(IdError::Charset { kind });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Parses and checks `s`.
            ///
            /// # Errors
            /// [`IdError`] when `s` is empty, too long or has a character outside
            /// `[A-Za-z0-9_-]`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_token($kind, s, $max)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A conversation thread's id: 1..=128 characters of `[A-Za-z0-9_-]`, so it can never
    /// contain the `:` that separates LMDB key fields (no thread's prefix matches another's).
    ThreadId,
    "thread id",
    128
);

string_id!(
    /// The id of a key-encryption key in the HSM: its `CKA_LABEL`. Together with a
    /// [`KekVersion`] (its `CKA_ID`) it names exactly one HSM object.
    KekId,
    "kek id",
    64
);

string_id!(
    /// One logical `create_dek_for_thread`, the same for all its attempts (on any replica):
    /// 1..=64 characters of `[A-Za-z0-9_-]`. The KMS derives the key id from it and the thread
    /// id ([`KeyId::derived`]), so a retry finds the key its lost first attempt made instead
    /// of making a second one.
    IdempotencyKey,
    "idempotency key",
    64
);

/// The id of one data-encryption key: `dek_` followed by 128 random bits in lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    const PREFIX: &'static str = "dek_";

    /// Builds a key id from 16 random bytes.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        let mut s = String::with_capacity(Self::PREFIX.len() + 32);
        s.push_str(Self::PREFIX);
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// The key id of the create identified by `key` for `thread`: the first 128 bits of
    /// SHA-256 over a domain tag, the thread id and the key, each length-prefixed (so no two
    /// different pairs give the same input). Deterministic, so every replica that sees the
    /// same request names the same key.
    pub fn derived(thread: &ThreadId, key: &IdempotencyKey) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            b"progressdb-kms/idempotent-key-id/v1".as_slice(),
            thread.as_str().as_bytes(),
            key.as_str().as_bytes(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let digest = ctx.finish();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_ref()[..16]);
        Self::from_random(id)
    }

    /// Parses `dek_<32 lowercase hex>`.
    ///
    /// # Errors
    /// [`IdError::KeyIdFormat`] for anything else.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let hex = s.strip_prefix(Self::PREFIX).ok_or(IdError::KeyIdFormat)?;
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(IdError::KeyIdFormat);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for KeyId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({:?})", self.0)
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Version of a KEK: a positive integer, starting at 1, raised by each rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct KekVersion(u32);

impl KekVersion {
    pub const FIRST: KekVersion = KekVersion(1);

    /// # Errors
    /// [`IdError::KekVersion`] for 0.
    pub fn new(v: u32) -> Result<Self, IdError> {
        if v == 0 {
            Err(IdError::KekVersion)
        } else {
            Ok(Self(v))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The next version, or `None` at `u32::MAX`.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Display for KekVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for KekVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = d.deserialize_u32(IntegralU32)?;
        Self::new(v).map_err(serde::de::Error::custom)
    }
}

/// A `u32`, also when written with a zero fraction (`3.0`): JSON Schema counts that as an
/// integer, so a client generated from the API reference may send it. Anything with a
/// fraction, negative or out of range is refused.
struct IntegralU32;

impl serde::de::Visitor<'_> for IntegralU32 {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer from 0 to 4294967295")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::custom("integer out of range"))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::custom("integer out of range"))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u32, E> {
        if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
            // Integral and in range: the cast is exact.
            Ok(v as u32)
        } else {
            Err(E::custom("expected an integer"))
        }
    }
}

/// A DEK wrapped under a KEK: an opaque, self-describing blob (its first byte is a format tag
/// chosen by the KMS backend). Not secret by itself, but it is key material, so `Debug` shows
/// only its length and it has no `Display`. Serialized as standard base64.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedDek(Vec<u8>);

impl WrappedDek {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// Standard base64, as stored in thread metadata.
    pub fn to_base64(&self) -> String {
        crate::b64::encode(&self.0)
    }

    /// # Errors
    /// When `s` is not standard base64 or is empty.
    pub fn from_base64(s: &str) -> Result<Self, crate::b64::InvalidBase64> {
        let v = crate::b64::decode(s.as_bytes())?;
        if v.is_empty() {
            return Err(crate::b64::InvalidBase64);
        }
        Ok(Self(v))
    }
}

impl fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedDek(<{} bytes>)", self.0.len())
    }
}

impl Serialize for WrappedDek {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for WrappedDek {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_base64(&s).map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_id_rules() {
        assert!(ThreadId::parse("t_01-abc").is_ok());
        assert!(ThreadId::parse("").is_err());
        assert!(ThreadId::parse("a:b").is_err());
        assert!(ThreadId::parse(&"x".repeat(129)).is_err());
        assert!(ThreadId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn key_id_round_trip() {
        let k = KeyId::from_random([0xab; 16]);
        assert_eq!(k.as_str().len(), 36);
        assert_eq!(KeyId::parse(k.as_str()), Ok(k.clone()));
        assert!(KeyId::parse("dek_ABABABABABABABABABABABABABABABAB").is_err());
        assert!(KeyId::parse("key_abababababababababababababababab").is_err());
        let j = serde_json::to_string(&k).unwrap();
        let back: KeyId = serde_json::from_str(&j).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn kek_version_is_positive() {
        assert!(KekVersion::new(0).is_err());
        assert!(serde_json::from_str::<KekVersion>("0").is_err());
        assert_eq!(serde_json::from_str::<KekVersion>("3").unwrap().get(), 3);
        assert_eq!(serde_json::from_str::<KekVersion>("3.0").unwrap().get(), 3);
        for bad in ["3.5", "-1", "4294967296", "0.0", "\"3\""] {
            assert!(serde_json::from_str::<KekVersion>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wrapped_debug_hides_bytes() {
        let w = WrappedDek::new(vec![0x41; 40]);
        let d = format!("{w:?}");
        assert_eq!(d, "WrappedDek(<40 bytes>)");
        assert!(!d.contains(&w.to_base64()));
    }
}
