//! The first stage of reading a KMS request body on the server side of the wire: JSON into
//! structs of plain strings ([`EncryptBody`] and friends), then each into its typed request
//! ([`EncryptRequest`], ...) by `TryFrom`. Two stages so every failure has its own stable
//! code without looking at serde's messages (which can quote the input): a body that is not
//! the schema is `malformed_request`, a binary field that is not base64 `invalid_base64`, a bad
//! id `invalid_argument`, an item over its size limit `payload_too_large`.
//!
//! The typed requests are the same ones the client sends, so both sides share one definition
//! of every body.

use secrecy::{ExposeSecret as _, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::ids::{IdempotencyKey, KeyId, ThreadId};
use crate::wire::{
    base64_len, Bytes64, CreateDekRequest, DecryptRequest, DestroyKeyRequest, EncryptRequest,
    ErrorCode, SecretBytes, MAX_AAD_BYTES, MAX_BATCH_ITEMS, MAX_ITEM_BYTES,
};

/// Why a request body was refused. Messages never quote the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Malformed(String),
    #[error("{field} is not valid standard base64")]
    InvalidBase64 { field: &'static str },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{field} is larger than {limit} bytes")]
    ItemTooLarge { field: &'static str, limit: usize },
}

impl ParseError {
    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::Malformed(_) => ErrorCode::MalformedRequest,
            ParseError::InvalidBase64 { .. } => ErrorCode::InvalidBase64,
            ParseError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ParseError::ItemTooLarge { .. } => ErrorCode::PayloadTooLarge,
        }
    }
}

/// `body` as JSON into `T`; a failure names its category and position only.
///
/// # Errors
/// [`ParseError::Malformed`].
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ParseError> {
    // Every request body is a JSON object; serde would also take a struct written as an
    // array of its fields in order, which is not the documented shape.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ParseError::Malformed(
            "request body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "request body is not valid JSON"
            }
            serde_json::error::Category::Data | serde_json::error::Category::Io => {
                "request body does not match the schema of this endpoint (missing, unknown or mistyped field)"
            }
        };
        ParseError::Malformed(format!("{what} (line {}, column {})", e.line(), e.column()))
    })
}

/// `POST /create_dek_for_thread`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDekBody {
    thread_id: String,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// `POST /encrypt` (and a batch item), as written. The plaintext text is secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptBody {
    key_id: String,
    plaintext: SecretString,
    #[serde(default)]
    aad: Option<String>,
}

/// `POST /decrypt` (and a batch item), as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecryptBody {
    key_id: String,
    ciphertext: String,
    #[serde(default)]
    aad: Option<String>,
}

/// `POST /destroy_key`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyKeyBody {
    key_id: String,
}

/// A batch, as written: its items are parsed one by one (a bad item fails alone).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody<T> {
    pub items: Vec<T>,
}

impl<T> BatchBody<T> {
    /// The items, at most [`MAX_BATCH_ITEMS`] of them.
    ///
    /// # Errors
    /// [`ParseError::InvalidArgument`] for a longer batch.
    pub fn into_items(self) -> Result<Vec<T>, ParseError> {
        if self.items.len() > MAX_BATCH_ITEMS {
            return Err(ParseError::InvalidArgument(format!(
                "a batch holds at most {MAX_BATCH_ITEMS} items"
            )));
        }
        Ok(self.items)
    }
}

fn key_id(s: &str) -> Result<KeyId, ParseError> {
    KeyId::parse(s).map_err(|e| ParseError::InvalidArgument(format!("key_id: {e}")))
}

fn decode_b64(field: &'static str, s: &str, limit: usize) -> Result<Vec<u8>, ParseError> {
    if s.len() > base64_len(limit) {
        return Err(ParseError::ItemTooLarge { field, limit });
    }
    let v = crate::b64::decode(s.as_bytes()).map_err(|_| ParseError::InvalidBase64 { field })?;
    if v.len() > limit {
        return Err(ParseError::ItemTooLarge { field, limit });
    }
    Ok(v)
}

/// A client's AAD: at most [`MAX_AAD_BYTES`], and never one that begins with
/// [`crate::RESERVED_AAD_PREFIX`]. The KMS binds its own records with AADs under that prefix
/// (e.g. a wrapped DEK's check: AES-GCM under the DEK of an empty message); a client that
/// could encrypt under a DEK with such an AAD could forge the binding of that DEK to another
/// key id.
fn aad(s: Option<&str>) -> Result<Option<Bytes64>, ParseError> {
    let Some(s) = s else { return Ok(None) };
    let v = decode_b64("aad", s, MAX_AAD_BYTES)?;
    if v.starts_with(crate::RESERVED_AAD_PREFIX) {
        return Err(ParseError::InvalidArgument(format!(
            "aad: begins with {:?}, reserved for the KMS's own bindings",
            String::from_utf8_lossy(crate::RESERVED_AAD_PREFIX)
        )));
    }
    Ok(Some(Bytes64(v)))
}

impl TryFrom<CreateDekBody> for CreateDekRequest {
    type Error = ParseError;
    fn try_from(b: CreateDekBody) -> Result<Self, ParseError> {
        let thread_id = ThreadId::parse(&b.thread_id)
            .map_err(|e| ParseError::InvalidArgument(format!("thread_id: {e}")))?;
        let idempotency_key = b
            .idempotency_key
            .as_deref()
            .map(IdempotencyKey::parse)
            .transpose()
            .map_err(|e| ParseError::InvalidArgument(format!("idempotency_key: {e}")))?;
        Ok(CreateDekRequest {
            thread_id,
            idempotency_key,
        })
    }
}

impl TryFrom<EncryptBody> for EncryptRequest {
    type Error = ParseError;
    /// Decodes the plaintext straight into zeroizing memory of its final size.
    fn try_from(b: EncryptBody) -> Result<Self, ParseError> {
        let key_id = key_id(&b.key_id)?;
        let text = b.plaintext.expose_secret();
        if text.len() > base64_len(MAX_ITEM_BYTES) {
            return Err(ParseError::ItemTooLarge {
                field: "plaintext",
                limit: MAX_ITEM_BYTES,
            });
        }
        let mut plaintext = crate::b64::decode_zeroizing(text.as_bytes())
            .map_err(|_| ParseError::InvalidBase64 { field: "plaintext" })?;
        // The text-length check above lets up to 2 bytes past the limit through (a final
        // quad without padding); the decoded length is what counts, so that every ciphertext
        // made here fits `/decrypt`'s limit.
        if plaintext.len() > MAX_ITEM_BYTES {
            return Err(ParseError::ItemTooLarge {
                field: "plaintext",
                limit: MAX_ITEM_BYTES,
            });
        }
        Ok(EncryptRequest {
            key_id,
            plaintext: SecretBytes::new(std::mem::take(&mut *plaintext)),
            aad: aad(b.aad.as_deref())?,
        })
    }
}

impl TryFrom<DecryptBody> for DecryptRequest {
    type Error = ParseError;
    fn try_from(b: DecryptBody) -> Result<Self, ParseError> {
        Ok(DecryptRequest {
            key_id: key_id(&b.key_id)?,
            ciphertext: Bytes64(decode_b64(
                "ciphertext",
                &b.ciphertext,
                MAX_ITEM_BYTES + crate::wire::CIPHERTEXT_OVERHEAD,
            )?),
            aad: aad(b.aad.as_deref())?,
        })
    }
}

impl TryFrom<DestroyKeyBody> for DestroyKeyRequest {
    type Error = ParseError;
    fn try_from(b: DestroyKeyBody) -> Result<Self, ParseError> {
        Ok(DestroyKeyRequest {
            key_id: key_id(&b.key_id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn enc(json: &str) -> Result<EncryptRequest, ParseError> {
        EncryptRequest::try_from(parse_json::<EncryptBody>(json.as_bytes())?)
    }

    #[test]
    fn a_client_aad_under_the_reserved_prefix_is_refused() {
        let k = "dek_00000000000000000000000000000000";
        for aad in [&b"progressdb-kms:dek:v1\0x"[..], b"progressdb-kms:"] {
            let body = format!(
                r#"{{"key_id":"{k}","plaintext":"","aad":"{}"}}"#,
                crate::b64::encode(aad)
            );
            let e = EncryptRequest::try_from(parse_json::<EncryptBody>(body.as_bytes()).unwrap())
                .unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
            let body = format!(
                r#"{{"key_id":"{k}","ciphertext":"{}","aad":"{}"}}"#,
                crate::b64::encode(&[0u8; 28]),
                crate::b64::encode(aad)
            );
            let e = DecryptRequest::try_from(parse_json::<DecryptBody>(body.as_bytes()).unwrap())
                .unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
        }
        // A prefix of the prefix, or the prefix later in the AAD, is a client's own.
        for aad in [&b"progressdb-kms"[..], b"x progressdb-kms:dek:v1"] {
            let body = format!(
                r#"{{"key_id":"{k}","plaintext":"","aad":"{}"}}"#,
                crate::b64::encode(aad)
            );
            assert!(
                EncryptRequest::try_from(parse_json::<EncryptBody>(body.as_bytes()).unwrap())
                    .is_ok()
            );
        }
    }

    #[test]
    fn plaintext_limit_is_on_decoded_bytes() {
        let k = "dek_00000000000000000000000000000000";
        let b64 = |n: usize| crate::b64::encode(&vec![7u8; n]);
        let at = enc(&format!(
            r#"{{"key_id":"{k}","plaintext":"{}"}}"#,
            b64(MAX_ITEM_BYTES)
        ));
        assert_eq!(at.unwrap().plaintext.expose().len(), MAX_ITEM_BYTES);
        for over in [MAX_ITEM_BYTES + 1, MAX_ITEM_BYTES + 2] {
            let text = b64(over);
            assert!(
                text.len() <= base64_len(MAX_ITEM_BYTES),
                "passes the text check"
            );
            let e = enc(&format!(r#"{{"key_id":"{k}","plaintext":"{text}"}}"#)).unwrap_err();
            assert!(
                matches!(e, ParseError::ItemTooLarge { .. }),
                "{over}: {e:?}"
            );
        }
    }

    #[test]
    fn each_failure_has_its_code_and_quotes_nothing() {
        let k = "dek_00000000000000000000000000000000";
        let ok = enc(&format!(
            r#"{{"key_id":"{k}","plaintext":"aGk=","aad":"YQ=="}}"#
        ))
        .unwrap();
        assert_eq!(ok.plaintext.expose(), b"hi");
        assert_eq!(ok.aad.unwrap().0, b"a");
        for (json, code) in [
            ("{not json".to_owned(), ErrorCode::MalformedRequest),
            // The fields as an array, which serde would take for the struct.
            (format!(r#"["{k}","aGk="]"#), ErrorCode::MalformedRequest),
            (r#" "a string" "#.to_owned(), ErrorCode::MalformedRequest),
            (
                format!(r#"{{"key_id":"{k}","plaintext":"aGk=","x":1}}"#),
                ErrorCode::MalformedRequest,
            ),
            (
                format!(r#"{{"key_id":"{k}","plaintext":"SECRET!!"}}"#),
                ErrorCode::InvalidBase64,
            ),
            (
                r#"{"key_id":"SECRET-ID","plaintext":"aGk="}"#.to_owned(),
                ErrorCode::InvalidArgument,
            ),
            (
                format!(r#"{{"key_id":"{k}","plaintext":"aGk=","aad":"%%"}}"#),
                ErrorCode::InvalidBase64,
            ),
        ] {
            let e = enc(&json).unwrap_err();
            assert_eq!(e.code(), code, "{json}");
            assert!(!e.to_string().contains("SECRET"), "{e}");
        }
        let big = "A".repeat(base64_len(MAX_ITEM_BYTES) + 4);
        let e = enc(&format!(r#"{{"key_id":"{k}","plaintext":"{big}"}}"#)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn typed_and_written_forms_agree() {
        // What the client serializes parses back into the same request.
        let r = EncryptRequest {
            key_id: KeyId::from_random([3; 16]),
            plaintext: SecretBytes::new(b"round trip".to_vec()),
            aad: Some(Bytes64(b"aad".to_vec())),
        };
        let json = serde_json::to_vec(&r).unwrap();
        let back = EncryptRequest::try_from(parse_json::<EncryptBody>(&json).unwrap()).unwrap();
        assert_eq!(back.plaintext.expose(), b"round trip");
        assert_eq!(back.key_id, r.key_id);
        let d = DecryptRequest {
            key_id: KeyId::from_random([4; 16]),
            ciphertext: Bytes64(vec![9; 40]),
            aad: None,
        };
        let json = serde_json::to_vec(&d).unwrap();
        let back = DecryptRequest::try_from(parse_json::<DecryptBody>(&json).unwrap()).unwrap();
        assert_eq!(back.ciphertext, d.ciphertext);
        let b: BatchBody<DecryptBody> =
            parse_json(format!(r#"{{"items":[{}]}}"#, String::from_utf8(json).unwrap()).as_bytes())
                .unwrap();
        assert_eq!(b.into_items().unwrap().len(), 1);
    }
}
