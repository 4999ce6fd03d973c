//! One side of `store copy` as the operator names it on the command line, for both binaries:
//! `lmdb:PATH` or `postgres:URL`.

use std::path::PathBuf;

/// One side of a copy, as `--from` / `--to` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `lmdb:PATH`: the LMDB store in directory PATH.
    Lmdb(PathBuf),
    /// `postgres:URL`: a libpq connection string (`postgresql://…` or `host=… dbname=…`).
    Postgres(String),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("lmdb:") {
            if path.is_empty() {
                return Err(
                    "lmdb: needs the store directory, e.g. lmdb:/var/lib/progressdb/store".into(),
                );
            }
            return Ok(StoreSpec::Lmdb(PathBuf::from(path)));
        }
        if let Some(url) = s.strip_prefix("postgres:") {
            // `postgres://…` is itself a libpq URL: keep the scheme.
            let url = if url.starts_with("//") {
                format!("postgres:{url}")
            } else {
                url.to_owned()
            };
            if url.is_empty() {
                return Err("postgres: needs a connection string".into());
            }
            return Ok(StoreSpec::Postgres(url));
        }
        if s.starts_with("postgresql://") {
            return Ok(StoreSpec::Postgres(s.to_owned()));
        }
        // (Not echoed: a connection string without its prefix may hold a password.)
        Err("not lmdb:PATH or postgres:URL (a libpq connection string)".into())
    }
}

/// The `--from` and `--to` of a `store copy`: each parsed, and not the same store.
///
/// # Errors
/// One line naming the argument at fault.
pub fn copy_pair(from: &str, to: &str) -> Result<(StoreSpec, StoreSpec), String> {
    let from = from
        .parse::<StoreSpec>()
        .map_err(|e| format!("--from: {e}"))?;
    let to = to.parse::<StoreSpec>().map_err(|e| format!("--to: {e}"))?;
    if from == to {
        return Err("--from and --to name the same store".into());
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::StoreSpec;

    #[test]
    fn specs_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            "lmdb:/x".parse::<StoreSpec>(),
            Ok(StoreSpec::Lmdb("/x".into()))
        );
        assert_eq!(
            "postgres:host=/tmp dbname=p".parse::<StoreSpec>(),
            Ok(StoreSpec::Postgres("host=/tmp dbname=p".into()))
        );
        assert_eq!(
            "postgres://u@h/db".parse::<StoreSpec>(),
            Ok(StoreSpec::Postgres("postgres://u@h/db".into()))
        );
        assert!("lmdb:".parse::<StoreSpec>().is_err());
        assert!("/x".parse::<StoreSpec>().unwrap_err().contains("lmdb:PATH"));
        assert!(super::copy_pair("lmdb:/x", "lmdb:/x")
            .unwrap_err()
            .contains("same store"));
        assert!(super::copy_pair("lmdb:/x", "nope")
            .unwrap_err()
            .starts_with("--to"));
        assert!(super::copy_pair("lmdb:/x", "lmdb:/y").is_ok());
    }
}
