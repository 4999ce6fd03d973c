//! Backups of the message store: one file, written while the server runs, restored into a
//! stopped, empty store, and checked against a KMS backup.
//!
//! # File
//! ```text
//! progressdb-backup/1\n
//! <manifest: one line of JSON>\n
//! <data.mdb: a compacted LMDB copy, made under one read transaction>
//! ```
//! The manifest ([`Manifest`]) gives the format, when the copy was made, the length and
//! SHA-256 of the data, how many threads and messages it holds, and every thread's id with
//! the key ids and KEK versions its messages need. A file whose data does not have that
//! length and digest, whose manifest does not parse, or whose store does not hold what the
//! manifest says, is refused whole: nothing is restored.
//!
//! The checksum finds corruption and truncation, not forgery. Messages, titles and metadata
//! of encrypted threads are ciphertext under DEKs the KMS holds (threads stored without
//! encryption are in the clear, as in the store), and every record read from a restored
//! store is checked as any other (AAD-bound ciphertext; a thread whose key the KMS does not
//! have reads as unreadable). Keep backups where only operators read and write.
//!
//! * [`snapshot`]: the server side (`POST /admin/backup`);
//! * [`restore`]: `progressdb restore`, offline;
//! * [`pair`]: `progressdb backup-check`: which threads a server backup and a KMS backup
//!   restored together would leave unreadable.

pub mod cli;
mod format;
pub mod pair;
mod restore;
mod snapshot;

pub use format::*;
pub use restore::*;
pub use snapshot::*;
