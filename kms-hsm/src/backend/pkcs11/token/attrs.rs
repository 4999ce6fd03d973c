//! Key attributes as the token reports them and as the KMS asks for them: the boolean flags
//! read back, the first requirement they fail, and the hardening some tokens refuse.

use cryptoki::object::{Attribute, AttributeType};

pub(super) fn bool_attr(a: &Attribute) -> Option<(AttributeType, bool)> {
    use AttributeType as T;
    Some(match a {
        Attribute::Token(v) => (T::Token, *v),
        Attribute::Private(v) => (T::Private, *v),
        Attribute::Sensitive(v) => (T::Sensitive, *v),
        Attribute::Extractable(v) => (T::Extractable, *v),
        Attribute::AlwaysSensitive(v) => (T::AlwaysSensitive, *v),
        Attribute::NeverExtractable(v) => (T::NeverExtractable, *v),
        Attribute::Local(v) => (T::Local, *v),
        Attribute::Encrypt(v) => (T::Encrypt, *v),
        Attribute::Decrypt(v) => (T::Decrypt, *v),
        Attribute::Wrap(v) => (T::Wrap, *v),
        Attribute::Unwrap(v) => (T::Unwrap, *v),
        Attribute::Sign(v) => (T::Sign, *v),
        Attribute::Verify(v) => (T::Verify, *v),
        Attribute::Derive(v) => (T::Derive, *v),
        Attribute::Modifiable(v) => (T::Modifiable, *v),
        _ => return None,
    })
}

/// The first of `requirements` that `flags` (what the token reported) does not meet, as a
/// reason; an attribute the token does not report is unmet (fail closed).
pub(super) fn unmet_requirement(
    flags: &[(AttributeType, bool)],
    requirements: &[(AttributeType, bool)],
) -> Option<String> {
    requirements
        .iter()
        .find_map(|(t, want)| match flags.iter().find(|(ft, _)| ft == t) {
            Some((_, v)) if v == want => None,
            Some((_, v)) => Some(format!("CKA_{} is {v}, must be {want}", attr_name(*t))),
            None => Some(format!("the token does not report CKA_{}", attr_name(*t))),
        })
}

/// `EXTRACTABLE`, `NEVER_EXTRACTABLE`, ...: the PKCS#11 name without its `CKA_` prefix.
pub(super) fn attr_name(t: AttributeType) -> &'static str {
    use AttributeType as T;
    match t {
        T::Token => "TOKEN",
        T::Private => "PRIVATE",
        T::Sensitive => "SENSITIVE",
        T::Extractable => "EXTRACTABLE",
        T::AlwaysSensitive => "ALWAYS_SENSITIVE",
        T::NeverExtractable => "NEVER_EXTRACTABLE",
        T::Local => "LOCAL",
        T::Encrypt => "ENCRYPT",
        T::Decrypt => "DECRYPT",
        T::Wrap => "WRAP",
        T::Unwrap => "UNWRAP",
        T::Sign => "SIGN",
        T::Verify => "VERIFY",
        T::Derive => "DERIVE",
        T::Modifiable => "MODIFIABLE",
        _ => "?",
    }
}

/// Hardening attributes some tokens refuse at generation time.
pub(super) fn kek_hardening() -> Vec<Attribute> {
    vec![Attribute::Modifiable(false), Attribute::Copyable(false)]
}
