//! The operator's tools, apart from the serving path: the command line ([`command`]), the
//! admin commands that talk to a running KMS's admin socket ([`cli`]), backup and restore
//! ([`backup`]), `check-config` ([`check`]) and `store copy` ([`storecopy`]). The service
//! never calls into them; they call the service's modules.

pub mod backup;
pub mod check;
pub mod cli;
pub mod command;
pub mod storecopy;
