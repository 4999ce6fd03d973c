//! Loading a service's configuration: a TOML file merged with environment overrides.
//!
//! Every key `section.key` of the file can be overridden by the environment variable
//! `<PREFIX>__SECTION__KEY` (e.g. `PROGRESSDB_KMS__CACHE__TTL_SECS`, `PROGRESSDB__HTTP__LISTEN`);
//! values are parsed as TOML scalars where they look like one (`false`, `30`) and taken as
//! strings otherwise. Unknown keys are refused by the target type (`deny_unknown_fields`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration file could not be loaded: one line naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {path}: {detail}")]
pub struct LoadError {
    pub path: PathBuf,
    pub detail: String,
}

/// Reads `path` (TOML), applies overrides from the environment (`env`, or the process
/// environment when `None`) whose names start with `prefix` + `__`, and deserializes the
/// result into `T`.
///
/// # Errors
/// [`LoadError`] when the file is missing or not a regular file, is not TOML, or does not fit
/// `T` (the message names the key, on one line).
pub fn load<T: DeserializeOwned>(
    path: &Path,
    prefix: &str,
    env: Option<HashMap<String, String>>,
) -> Result<T, LoadError> {
    let err = |detail: String| LoadError {
        path: path.to_owned(),
        detail,
    };
    if !path.is_file() {
        return Err(err("not found or not a regular file".into()));
    }
    let env_source = ::config::Environment::with_prefix(prefix)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(env);
    ::config::Config::builder()
        .add_source(::config::File::from(path).format(::config::FileFormat::Toml))
        .add_source(env_source)
        .build()
        .and_then(::config::Config::try_deserialize)
        .map_err(|e| err(one_line(&e.to_string())))
}

/// `s` on one line (the `config` crate's messages can span several).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The directory relative paths of the config file at `path` are resolved against.
///
/// # Errors
/// [`LoadError`] when the path cannot be made absolute.
pub fn base_dir(path: &Path) -> Result<PathBuf, LoadError> {
    let absolute = std::path::absolute(path).map_err(|e| LoadError {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    Ok(absolute.parent().map(Path::to_owned).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        a: Section,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        n: u32,
        flag: bool,
        name: String,
    }

    #[test]
    fn file_then_environment() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, "[a]\nn = 1\nflag = true\nname = \"x\"\n").unwrap();
        let c: Conf = load(&p, "PFX", Some(HashMap::new())).unwrap();
        assert_eq!((c.a.n, c.a.flag, c.a.name.as_str()), (1, true, "x"));
        let env = HashMap::from([
            ("PFX__A__N".to_owned(), "7".to_owned()),
            ("PFX__A__FLAG".to_owned(), "false".to_owned()),
            ("OTHER__A__N".to_owned(), "9".to_owned()),
        ]);
        let c: Conf = load(&p, "PFX", Some(env)).unwrap();
        assert_eq!((c.a.n, c.a.flag), (7, false));
        std::fs::write(&p, "[a]\nn = 1\nflag = true\nname = \"x\"\nextra = 2\n").unwrap();
        let e = load::<Conf>(&p, "PFX", Some(HashMap::new())).unwrap_err();
        assert!(
            e.to_string().contains("extra") && !e.to_string().contains('\n'),
            "{e}"
        );
        let e = load::<Conf>(&d.path().join("none.toml"), "PFX", None).unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
    }
}

/// A TOML array of strings, or (from the environment, where every value is text) a
/// comma-separated list. Empty items are dropped.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum StringList {
    Many(Vec<String>),
    Text(String),
}

impl StringList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringList::Many(v) => v,
            StringList::Text(t) => t.split(',').map(|s| s.trim().to_owned()).collect(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// `#[serde(deserialize_with = "string_list")]` for a `Vec<String>` field set by a
/// [`StringList`].
///
/// # Errors
/// When the value is neither a list of strings nor a string.
pub fn string_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    <StringList as serde::Deserialize>::deserialize(d).map(StringList::into_vec)
}
