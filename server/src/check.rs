//! `progressdb check-config --config FILE`: validates a configuration and everything it names
//! without starting the server: every key (as `serve` would read them), the listen address,
//! the store directory, the API keys file (mode and content), the KMS endpoint (TLS files for
//! `https://`, the socket for `unix://`, whether a KMS answers there now) and, in dev builds,
//! the embedded provider's master key. Nothing is created or changed beyond a probe file
//! created and removed in each directory checked. No secret is printed.

use std::path::Path;

use kms_api::Endpoint;
use service_kit::check::Report;

use crate::auth::ApiKeys;
use crate::config::{Config, KmsMode};

/// Runs every check of `path`; see the module docs.
pub fn run(path: &Path) -> Report {
    let mut r = Report::new();
    let Some(cfg) = r.config(path, Config::load(path)) else {
        return r;
    };
    match std::net::TcpListener::bind(cfg.http.listen) {
        Ok(_) => r.ok(format!("http.listen {}", cfg.http.listen), "the address can be bound"),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r.warn(
            format!("http.listen {}", cfg.http.listen),
            "in use now",
            "fine if this is the running server; otherwise stop the other process or change the port",
        ),
        Err(e) => r.problem(
            format!("http.listen {}", cfg.http.listen),
            format!("cannot be bound: {e}"),
            "use an address of this host and a port this user may bind (>= 1024 without CAP_NET_BIND_SERVICE)",
        ),
    }
    match cfg.store.postgres() {
        Ok(Some(pg)) => r.postgres_store(&pg, &crate::store::postgres::SCHEMA, "progressdb", true),
        Ok(None) => r.store_dir(&cfg.store.path, crate::store::LOCK_FILE),
        Err(e) => r.problem(e.key, e.reason, "see docs/server.md, [store]"),
    }
    if r.secret_file("auth.keys_file", &cfg.auth.keys_file) {
        match ApiKeys::load(&cfg.auth.keys_file) {
            Ok(_) => r.ok("auth.keys_file", "API keys and signing secret read"),
            Err(e) => r.problem(
                "auth.keys_file",
                e.to_string(),
                "see docs/server.md for the keys file format",
            ),
        }
    }
    if !cfg.encryption.enabled {
        r.warn(
            "encryption.enabled",
            "false: new message content is stored in plain form",
            "set encryption.enabled = true with a KMS endpoint",
        );
    }
    kms(&mut r, &cfg);
    r
}

fn kms(r: &mut Report, cfg: &Config) {
    let k = &cfg.kms;
    match k.mode {
        KmsMode::Embedded => {
            r.warn(
                "kms.mode",
                "\"embedded\": DEKs are wrapped by a software master key in this process",
                "use kms.mode = \"external\" with progressdb-kms outside development",
            );
            if let Some(p) = &k.master_key_file {
                master_key(r, p);
            }
            return;
        }
        KmsMode::External => {}
    }
    if let Some(p) = &k.master_key_file {
        master_key(r, p);
    }
    // `Config::load` made sure an endpoint is set when encryption needs one.
    let endpoints = match k.parsed_endpoints() {
        Ok(e) => e,
        Err(e) => {
            r.problem(
                if k.endpoints.is_some() {
                    "kms.endpoints"
                } else {
                    "kms.endpoint"
                },
                e.to_string(),
                "unix:///path/kms.sock or https://host:port",
            );
            return;
        }
    };
    let key = if k.endpoints.is_some() {
        "kms.endpoints"
    } else {
        "kms.endpoint"
    };
    if endpoints
        .iter()
        .any(|e| matches!(e, Endpoint::Https { .. }))
    {
        if let (Some(ca), Some(cert), Some(key)) = (&k.ca, &k.client_cert, &k.client_key) {
            if r.secret_file("kms.client_key", key) {
                match kms_api::tls::client_config(ca, cert, key) {
                    Ok(_) => r.ok(
                        "kms.ca, kms.client_cert, kms.client_key",
                        "the CA, client certificate and key make a TLS client configuration",
                    ),
                    Err(e) => r.problem(
                        "kms.ca, kms.client_cert, kms.client_key",
                        e.to_string(),
                        "PEM files: the KMS's CA, this server's certificate and its key",
                    ),
                }
            }
        }
    }
    for endpoint in endpoints {
        match endpoint {
            Endpoint::Unix(path) => {
                let subject = format!("{key} unix://{}", path.display());
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(_) => r.ok(subject, "a KMS accepts connections there now"),
                    Err(e) => r.warn(
                        subject,
                        format!("no KMS answers now ({e}); the server starts anyway and answers 503 until one does"),
                        "start progressdb-kms, or check the path and that this user may open the socket (listen.allowed_uids)",
                    ),
                }
            }
            Endpoint::Https { host, port } => {
                let subject = format!("{key} https://{host}:{port}");
                match std::net::TcpStream::connect((host.as_str(), port)) {
                    Ok(_) => r.ok(subject, "a KMS accepts TCP connections there now"),
                    Err(e) => r.warn(
                        subject,
                        format!("no KMS answers now ({e}); the server starts anyway and answers 503 until one does"),
                        "start progressdb-kms, or check the host, port and firewall",
                    ),
                }
            }
        }
    }
}

#[cfg(feature = "dev-embedded")]
fn master_key(r: &mut Report, path: &Path) {
    if r.secret_file("kms.master_key_file", path) {
        match crate::provider::embedded::MasterKey::load(path) {
            Ok(_) => r.ok("kms.master_key_file", "a 32-byte key (hex or base64)"),
            Err(e) => r.problem(
                "kms.master_key_file",
                e.to_string(),
                "write 32 random bytes as hex: head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            ),
        }
    }
}

#[cfg(not(feature = "dev-embedded"))]
fn master_key(r: &mut Report, path: &Path) {
    r.problem(
        format!("kms.master_key_file {}", path.display()),
        "is only supported in dev builds (--features dev-embedded)",
        "remove it from the configuration",
    );
}
