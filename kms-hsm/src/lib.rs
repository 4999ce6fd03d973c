//! progressdb-kms: the key-management service of progressdb.
pub mod backend;
