//! Identifiers and timestamps of the server: [`MessageId`], [`UserId`], [`Timestamp`], and
//! the generators of new thread and message ids.
//!
//! Thread ids are [`kms_api::ThreadId`] (no `:` possible). Every id type here is parsed once at
//! the edge, so code holding one never re-checks it.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use kms_api::ThreadId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("message id must look like <20-digit unix nanos>-<6-digit sequence>")]
    MessageId,
    #[error(
        "user id must be 1 to 256 bytes of UTF-8 (at most 320 once each byte outside [A-Za-z0-9_.@+-] counts three) without control or invisible format characters or white space at either end"
    )]
    UserId,
}

/// A point in time: nanoseconds since the Unix epoch (UTC). Rendered as RFC 3339 in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_nanos(n: u64) -> Self {
        Self(n)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The wall clock now. A clock before 1970 reads as the epoch; one after year 2554 (the
    /// end of `u64` nanoseconds) saturates.
    pub fn now() -> Self {
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self(n)
    }

    /// RFC 3339 in UTC with nanoseconds, e.g. `2024-05-01T12:00:00.000000001Z`.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0 / 1_000_000_000;
        let nanos = self.0 % 1_000_000_000;
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`, restricted to non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A message's id: `<ts>-<seq>`, the unix-nanosecond creation time in 20 zero-padded digits and
/// a 6-digit sequence number. Fixed width, so the byte order of ids is their time order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    ts: u64,
    seq: u32,
}

impl MessageId {
    /// Width of the encoded id in bytes.
    pub const LEN: usize = 20 + 1 + 6;
    /// Largest sequence number (6 digits).
    pub const MAX_SEQ: u32 = 999_999;

    /// # Errors
    /// [`IdError::MessageId`] when `seq` does not fit in 6 digits.
    pub fn new(ts: Timestamp, seq: u32) -> Result<Self, IdError> {
        if seq > Self::MAX_SEQ {
            return Err(IdError::MessageId);
        }
        Ok(Self { ts: ts.0, seq })
    }

    pub fn timestamp(self) -> Timestamp {
        Timestamp(self.ts)
    }

    pub fn seq(self) -> u32 {
        self.seq
    }

    /// The smallest id greater than this one (the next sequence number, or the next
    /// nanosecond after the last one); `self` at the very end of the id space.
    pub fn successor(self) -> MessageId {
        if self.seq < Self::MAX_SEQ {
            MessageId {
                ts: self.ts,
                seq: self.seq + 1,
            }
        } else if self.ts < u64::MAX {
            MessageId {
                ts: self.ts + 1,
                seq: 0,
            }
        } else {
            self
        }
    }

    /// The greatest id smaller than this one, or `None` for the very first id.
    pub fn predecessor(self) -> Option<MessageId> {
        if self.seq > 0 {
            Some(MessageId {
                ts: self.ts,
                seq: self.seq - 1,
            })
        } else if self.ts > 0 {
            Some(MessageId {
                ts: self.ts - 1,
                seq: Self::MAX_SEQ,
            })
        } else {
            None
        }
    }

    /// Parses exactly `dddddddddddddddddddd-dddddd`.
    ///
    /// # Errors
    /// [`IdError::MessageId`] for anything else.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let b = s.as_bytes();
        if b.len() != Self::LEN || b[20] != b'-' {
            return Err(IdError::MessageId);
        }
        let (ts, seq) = (&s[..20], &s[21..]);
        if !ts.bytes().chain(seq.bytes()).all(|c| c.is_ascii_digit()) {
            return Err(IdError::MessageId);
        }
        let ts: u64 = ts.parse().map_err(|_| IdError::MessageId)?;
        let seq: u32 = seq.parse().map_err(|_| IdError::MessageId)?;
        Self::new(Timestamp(ts), seq)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:020}-{:06}", self.ts, self.seq)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The id of an end user, as sent in `X-User-ID`: 1..=128 characters of
/// `[A-Za-z0-9_.@+-]`. Never contains `:`, so it can be a field of an LMDB key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(String);

impl UserId {
    /// Longest id, in bytes of UTF-8.
    pub const MAX_LEN: usize = 256;

    /// Longest [`UserId::key_segment`]: store keys hold it, and LMDB keys end at 511 bytes
    /// (`idx:author:<segment>:<thread id>` stays within them).
    pub const MAX_SEGMENT_LEN: usize = 320;

    /// Any id an identity provider issues (`google-oauth2|1234`, an e-mail address, a
    /// non-ASCII name): 1 to [`UserId::MAX_LEN`] bytes of UTF-8 without control characters,
    /// invisible format characters (zero-width, bidirectional overrides) or line separators,
    /// without white space at either end (`"alice "` is not a second `alice`), and at most
    /// [`UserId::MAX_SEGMENT_LEN`] bytes once each byte outside `[A-Za-z0-9_.@+-]` counts
    /// three (about 100 bytes of non-ASCII text).
    ///
    /// # Errors
    /// [`IdError::UserId`] for any other text.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let invisible = |c: char| {
            c.is_control()
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
        };
        let plain =
            |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+');
        let segment_len: usize = s.bytes().map(|b| if plain(&b) { 1 } else { 3 }).sum();
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && segment_len <= Self::MAX_SEGMENT_LEN
            && !s.chars().any(invisible)
            && s.trim() == s;
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::UserId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as one field of a store key: bytes outside `[A-Za-z0-9_.@+-]` (`:`, `%`, `|`,
    /// white space, non-ASCII) as `%XX`, so the field never contains the key separator `:`
    /// and two ids never share an encoding. Ids made only of that set (every id accepted
    /// before this encoding existed) are their own encoding.
    pub fn key_segment(&self) -> std::borrow::Cow<'_, str> {
        let plain =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+');
        if self.0.bytes().all(plain) {
            return std::borrow::Cow::Borrowed(&self.0);
        }
        let mut out = String::with_capacity(self.0.len() * 3);
        for b in self.0.bytes() {
            if plain(b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// The id whose [`UserId::key_segment`] is `seg`.
    ///
    /// # Errors
    /// [`IdError::UserId`] when `seg` is not such an encoding (a bad escape, an escaped byte
    /// that needed none, text that is not UTF-8, or an id [`UserId::parse`] refuses).
    pub fn from_key_segment(seg: &str) -> Result<Self, IdError> {
        let b = seg.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = seg.get(i + 1..i + 3).ok_or(IdError::UserId)?;
                if hex.bytes().any(|h| h.is_ascii_lowercase()) {
                    return Err(IdError::UserId);
                }
                out.push(u8::from_str_radix(hex, 16).map_err(|_| IdError::UserId)?);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        let id = Self::parse(std::str::from_utf8(&out).map_err(|_| IdError::UserId)?)?;
        // One encoding per id: a segment that escapes what needs no escape is not one.
        if id.key_segment() == seg {
            Ok(id)
        } else {
            Err(IdError::UserId)
        }
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({:?})", self.0)
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A new thread id: `t` + 16 hex digits of the creation time in unix nanos + 16 random hex
/// digits. Ids of threads sort by creation time, and two servers never collide in practice.
pub fn new_thread_id(now: Timestamp) -> ThreadId {
    let r: u64 = rand::random();
    let s = format!("t{:016x}{r:016x}", now.as_nanos());
    // Invariant: 33 characters of `t` and `[0-9a-f]`, within ThreadId's length and charset,
    // so parsing cannot fail.
    ThreadId::parse(&s).unwrap_or_else(|_| unreachable!("t + 32 hex digits is a valid ThreadId"))
}

/// Hands out strictly increasing [`MessageId`]s within this process: the timestamp never goes
/// backwards (a clock step back keeps the last timestamp and bumps the sequence), and a
/// sequence overflow moves to the next nanosecond.
#[derive(Debug, Default)]
pub struct MessageIdGen {
    last: Mutex<(u64, u32)>,
}

impl MessageIdGen {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next(&self) -> MessageId {
        self.next_at(Timestamp::now())
    }

    /// The next id, given the clock reads `now`.
    pub fn next_at(&self, now: Timestamp) -> MessageId {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (last_ts, last_seq) = *last;
        let (ts, seq) = if now.0 > last_ts {
            (now.0, 0)
        } else if last_seq < MessageId::MAX_SEQ {
            (last_ts, last_seq + 1)
        } else {
            (last_ts.saturating_add(1), 0)
        };
        *last = (ts, seq);
        MessageId { ts, seq }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn message_id_round_trip_and_width() {
        let id = MessageId::new(Timestamp::from_nanos(1_700_000_000_123_456_789), 42).unwrap();
        let s = id.to_string();
        assert_eq!(s, "01700000000123456789-000042");
        assert_eq!(s.len(), MessageId::LEN);
        assert_eq!(MessageId::parse(&s).unwrap(), id);
        for bad in [
            "",
            "1-1",
            "0170000000012345678-000042",
            "01700000000123456789x000042",
            "0170000000012345678x-000042",
            "01700000000123456789-00004a",
            "+1700000000123456789-000042",
            "01700000000123456789-+00042",
        ] {
            assert!(MessageId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_ids_sort_as_strings_in_time_order() {
        let mut ids = vec![
            MessageId::new(Timestamp::from_nanos(9), 0).unwrap(),
            MessageId::new(Timestamp::from_nanos(10), 0).unwrap(),
            MessageId::new(Timestamp::from_nanos(10), 1).unwrap(),
            MessageId::new(Timestamp::from_nanos(10), 10).unwrap(),
            MessageId::new(Timestamp::from_nanos(u64::MAX), 0).unwrap(),
            MessageId::new(Timestamp::from_nanos(100), 2).unwrap(),
        ];
        let mut as_strings: Vec<String> = ids.iter().map(ToString::to_string).collect();
        ids.sort();
        as_strings.sort();
        let back: Vec<MessageId> = as_strings.iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(ids, back);
    }

    #[test]
    fn id_gen_is_strictly_increasing_even_when_the_clock_steps_back() {
        let g = MessageIdGen::new();
        let a = g.next_at(Timestamp::from_nanos(1000));
        let b = g.next_at(Timestamp::from_nanos(1000));
        let c = g.next_at(Timestamp::from_nanos(5));
        let d = g.next_at(Timestamp::from_nanos(2000));
        assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
        assert_eq!(c.timestamp().as_nanos(), 1000);
        let g = MessageIdGen::new();
        *g.last.lock().unwrap() = (7, MessageId::MAX_SEQ);
        let e = g.next_at(Timestamp::from_nanos(1));
        assert_eq!((e.timestamp().as_nanos(), e.seq()), (8, 0));
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse("u_1-2.3+x").is_ok());
        assert!(UserId::parse("").is_err());
        // As identity providers issue them.
        for ok in [
            "google-oauth2|1234",
            "auth0:abc",
            "a b",
            "Zoë",
            "用户",
            "100%",
        ] {
            assert!(UserId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [" a", "a ", "a\nb", "a\u{0}b", "\u{7f}"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UserId::parse(&"x".repeat(256)).is_ok());
        assert!(UserId::parse(&"é".repeat(129)).is_err(), "258 bytes");
        // Invisible characters that would make two ids look alike.
        for bad in ["a\u{200B}b", "a\u{202E}b", "a\u{2028}b", "\u{FEFF}a"] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
        // The store-key form stays within LMDB's key limit.
        assert!(
            UserId::parse(&"用".repeat(35)).is_ok(),
            "105 bytes, 315 encoded"
        );
        assert!(
            UserId::parse(&"用".repeat(36)).is_err(),
            "108 bytes, 324 encoded"
        );
        let longest = UserId::parse(&"用".repeat(35)).unwrap();
        let key = crate::store::keys::author_index(
            &longest,
            &kms_api::ThreadId::parse(&"t".repeat(128)).unwrap(),
        );
        assert!(key.len() <= 511, "{}", key.len());
    }

    #[test]
    fn user_key_segments_are_injective_and_never_hold_a_colon() {
        let ids = [
            "alice",
            "a:b",
            "a%3Ab",
            "a%b",
            "google-oauth2|1234",
            "Zoë",
            "a b",
            "a+b",
            "%",
        ];
        let mut seen = std::collections::HashSet::new();
        for s in ids {
            let u = UserId::parse(s).unwrap();
            let seg = u.key_segment();
            assert!(
                !seg.contains(':') && !seg.contains(';') && seg.is_ascii(),
                "{seg}"
            );
            assert!(seen.insert(seg.to_string()), "two ids share {seg}");
            assert_eq!(UserId::from_key_segment(&seg).unwrap(), u);
        }
        // Ids of the old character set are their own segment (existing keys stay valid).
        assert_eq!(
            UserId::parse("bob@x.y+z_1-2").unwrap().key_segment(),
            "bob@x.y+z_1-2"
        );
        assert_eq!(UserId::parse("a:b").unwrap().key_segment(), "a%3Ab");
        // Not an encoding: a bad escape, a lowercase or needless escape, bytes that are
        // not UTF-8.
        for bad in ["a%", "a%3", "a%3a", "%61", "%FF", "a:b", ""] {
            assert!(UserId::from_key_segment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(
            Timestamp::from_nanos(0).to_rfc3339(),
            "1970-01-01T00:00:00.000000000Z"
        );
        assert_eq!(
            Timestamp::from_nanos(951_782_400_000_000_001).to_rfc3339(),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            Timestamp::from_nanos(1_700_000_000_000_000_000).to_rfc3339(),
            "2023-11-14T22:13:20.000000000Z"
        );
    }

    #[test]
    fn thread_ids_are_valid_and_time_ordered() {
        let a = new_thread_id(Timestamp::from_nanos(1));
        let b = new_thread_id(Timestamp::from_nanos(2));
        assert!(a < b);
        assert_eq!(a.as_str().len(), 33);
    }
}
