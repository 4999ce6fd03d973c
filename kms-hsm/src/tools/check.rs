//! `progressdb-kms check-config --config FILE`: validates a configuration and everything it
//! names without starting the KMS: every key (as `serve` would read them), the socket and
//! store directories, the TLS files, the PIN file's mode, and, through PKCS#11, the module,
//! the token (by label), the PIN (one login: tokens count failed logins), the current KEK
//! (present once, hardened) and the audit key. Nothing is created or changed, in the token or
//! on disk, beyond a probe file created and removed in each directory checked.
//! `--no-login` skips the token part (for a check before every start).

use std::path::Path;

use service_kit::check::Report;

use crate::backend::pkcs11::{check_token, TokenCheck};
use crate::backend::{BackendError, HmacRole};
use crate::config::{Config, ListenConfig, SocketAccess, PIN_ENV};

/// Whether `check-config` logs in to the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Login {
    /// Load the module, find the token, log in once, look for the KEK and the audit key.
    Try,
    /// Check only what needs no login (e.g. before every start, from a systemd
    /// `ExecStartPre=`, where a wrong PIN must not cost a second failed login).
    Skip,
}

/// Runs every check of `path`; see the module docs.
pub fn run(path: &Path, login: Login) -> Report {
    let mut r = Report::new();
    let Some(cfg) = r.config(path, Config::load(path)) else {
        return r;
    };
    listen(&mut r, &cfg);
    store(&mut r, &cfg, login);
    hsm(&mut r, &cfg, path, login);
    r
}

/// LMDB: the store directory. PostgreSQL: the password file, the CA file, and (unless
/// `--no-login`) a connection that applies no migration but reads the schema version.
fn store(r: &mut Report, cfg: &Config, login: Login) {
    use crate::config::StoreBackend;
    let pg = match &cfg.store.backend {
        StoreBackend::Lmdb { .. } => {
            r.store_dir(&cfg.store.path, crate::keystore::lmdb::LOCK_FILE);
            return;
        }
        StoreBackend::Postgres(pg) => pg,
    };
    r.postgres_store(
        pg,
        &crate::keystore::postgres::SCHEMA,
        "progressdb-kms",
        login == Login::Try,
    );
}

fn listen(r: &mut Report, cfg: &Config) {
    match &cfg.listen {
        ListenConfig::Unix {
            path,
            access,
            allowed_uids,
        } => {
            r.socket_dir("listen.unix", path);
            if *access == SocketAccess::Group {
                r.ok(
                    "listen.socket_access",
                    "\"group\": the client socket is mode 0660; peers are still checked against listen.allowed_uids",
                );
            }
            let me = rustix::process::getuid().as_raw();
            if allowed_uids.is_none() && cfg.admin.uids == [me] {
                r.warn(
                    "listen.allowed_uids",
                    format!(
                        "unset: the client socket admits the KMS's own uid {me}, which is also the default admin (listen.admin_uids); a server running as this user can use the admin API"
                    ),
                    "run progressdb as its own user and set listen.allowed_uids = [its uid] (docs/deploy.md)",
                );
            }
        }
        ListenConfig::Tcp { tls, .. } => {
            match kms_api::tls::load_certs(&tls.cert) {
                Ok(_) => r.ok(
                    format!("tls.cert {}", tls.cert.display()),
                    "certificate chain reads",
                ),
                Err(e) => r.problem(
                    format!("tls.cert {}", tls.cert.display()),
                    e.to_string(),
                    "point it at the PEM certificate chain of the KMS",
                ),
            }
            if r.secret_file("tls.key", &tls.key) {
                if let Err(e) = kms_api::tls::load_key(&tls.key) {
                    r.problem(
                        format!("tls.key {}", tls.key.display()),
                        e.to_string(),
                        "point it at the PEM private key of tls.cert",
                    );
                }
            }
            match kms_api::tls::load_roots(&tls.client_ca) {
                Ok(_) => r.ok(
                    format!("tls.client_ca {}", tls.client_ca.display()),
                    "CA certificates read",
                ),
                Err(e) => r.problem(
                    format!("tls.client_ca {}", tls.client_ca.display()),
                    e.to_string(),
                    "point it at the PEM certificate of the CA that issues client certificates",
                ),
            }
            if let Err(e) = kms_api::tls::server_config(&tls.cert, &tls.key, &tls.client_ca) {
                r.problem(
                    "tls",
                    format!("the TLS files do not make a server configuration: {e}"),
                    "check that tls.key is the key of tls.cert",
                );
            }
            if tls.admin_subjects.is_empty() {
                r.ok(
                    "tls.admin_subjects",
                    "empty: no TCP client is an admin (the admin API is on listen.admin_unix only)",
                );
            }
        }
    }
    r.socket_dir("listen.admin_unix", &cfg.admin.unix);
    if cfg.admin.unix.exists() && std::os::unix::net::UnixStream::connect(&cfg.admin.unix).is_ok() {
        r.ok(
            format!("listen.admin_unix {}", cfg.admin.unix.display()),
            "a KMS is serving on it now",
        );
    }
}

fn hsm(r: &mut Report, cfg: &Config, path: &Path, login: Login) {
    let module = &cfg.hsm.module;
    if !module.is_file() {
        r.problem(
            format!("hsm.module {}", module.display()),
            "does not exist or is not a file",
            "install the HSM vendor's PKCS#11 library and set its absolute path",
        );
        return;
    }
    match &cfg.hsm.pin_file {
        Some(p) => {
            if !r.secret_file("hsm.pin_file", p) {
                return;
            }
        }
        None => r.ok(PIN_ENV, "the PIN comes from the environment"),
    }
    let settings = match cfg.hsm_settings() {
        Ok(s) => s,
        Err(e) => {
            r.problem(
                "hsm.pin_file",
                e.to_string(),
                "give the PIN in exactly one way",
            );
            return;
        }
    };
    if login == Login::Skip {
        r.ok(
            "hsm",
            "token, PIN and KEK not checked (--no-login); serve checks them at start",
        );
        return;
    }
    let label = &cfg.hsm.token_label;
    let kek = &cfg.hsm.kek_label;
    match check_token(&settings) {
        Ok(TokenCheck {
            kek: found,
            hmac_keys,
        }) => {
            r.ok(
                format!("hsm.token_label {label}"),
                "token found; the PIN logs in",
            );
            match found {
                Some(k) => r.ok(
                    format!("hsm.kek_label {kek}"),
                    format!("current version {} is present once and hardened", k.version),
                ),
                None => r.problem(
                    format!("hsm.kek_label {kek}"),
                    format!("no KEK with this label on token '{label}'"),
                    format!("progressdb-kms init-kek --config {}", path.display()),
                ),
            }
            for (role, label) in [
                (HmacRole::Audit, &cfg.hsm.audit_key_label),
                (HmacRole::Binding, &cfg.hsm.binding_key_label),
            ] {
                let what = format!("{} {label}", role.config_key());
                if hmac_keys.contains(&role) {
                    r.ok(what, format!("{role} key present and hardened"));
                } else {
                    r.ok(what, "absent: created by init-kek or at the first start");
                }
            }
        }
        Err(BackendError::PinRejected(_)) => r.problem(
            "hsm.pin_file",
            format!("token '{label}' refused the PIN (this check tried once; the token counts failures)"),
            "write the token's user PIN into the file",
        ),
        Err(BackendError::KekRefused { id, version, reason }) => r.problem(
            format!("hsm.kek_label {id}"),
            format!("version {version} is refused: {reason}"),
            "remove or replace that object; the KMS only uses KEKs it generated itself",
        ),
        Err(BackendError::HmacKey {
            role,
            label,
            reason,
        }) => r.problem(
            format!("{} {label}", role.config_key()),
            reason,
            format!(
                "remove the object with that label or choose another {}",
                role.config_key()
            ),
        ),
        Err(e) => r.problem(
            format!("hsm (module {}, token '{label}')", module.display()),
            e.to_string(),
            "check hsm.module, hsm.token_label and that the HSM is reachable",
        ),
    }
}
