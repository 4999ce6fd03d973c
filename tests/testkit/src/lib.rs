//! Test support shared by `kms-hsm/tests` and the end-to-end tests in `tests/`: the one
//! process harness of the KMS ([`kms`]: a typed builder, the running process, its clients),
//! child processes and the binaries under test ([`proc`]), real PKCS#11 tokens (SoftHSM or
//! Kryoptic, [`token`]) in their own directories, TLS material for mutual TLS, scans of logs
//! and files for secrets in every encoding they could take, and private PostgreSQL clusters
//! ([`pg`]). docs/testing.md says which harness to use when.
//!
//! Nothing here skips: a missing `softhsm2-util` fails the calling test with a message that
//! says what to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod kms;
pub mod pg;
pub mod proc;

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngCore as _;

/// Path of the SoftHSM PKCS#11 module on Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A random lowercase hex string of `n` bytes.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A TCP port on 127.0.0.1 that is free now, for a program that cannot bind port 0 itself and
/// report the port (PostgreSQL, whose socket file is named after its port; `scripts/dev.sh`,
/// which derives its URLs from `PORT`). The KMS and the server bind port 0 and the harness
/// reads the port back ([`proc::Proc::wait_tcp_port`]).
///
/// The port is released before the program binds it, so it is picked at random below the
/// kernel's ephemeral range (`net.ipv4.ip_local_port_range`): the ports the kernel hands out
/// for port 0 and for outgoing connections, which every other test uses, can never take it.
/// Only another explicit bind of the same number could, which a random pick out of thousands
/// makes unlikely.
pub fn free_port() -> u16 {
    let low: u16 = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.saturating_sub(1));
    if to > from {
        for _ in 0..200 {
            let port = from + (rand::random::<u16>() % (to - from));
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `content` to `path`, created with mode 0600 (never readable by others, not even
/// for a moment).
pub fn write_secret(path: &Path, content: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// The PKCS#11 implementation every HSM test runs on, chosen by `PROGRESSDB_TEST_TOKEN`:
/// `softhsm` (SoftHSMv2, the default) or `kryoptic` (the Rust soft token, built by
/// `scripts/build-kryoptic.sh` into `target/kryoptic/`). The suites are written against this
/// module only, so a third implementation (a real HSM's module) is one variant away.
pub mod token {
    use super::*;
    use std::process::Command;

    /// Which PKCS#11 module.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        SoftHsm,
        Kryoptic,
    }

    /// The token of this test run (`PROGRESSDB_TEST_TOKEN`); an unknown name fails the test.
    pub fn kind() -> Kind {
        match std::env::var("PROGRESSDB_TEST_TOKEN").as_deref() {
            Err(_) | Ok("") | Ok("softhsm") => Kind::SoftHsm,
            Ok("kryoptic") => Kind::Kryoptic,
            Ok(other) => panic!("PROGRESSDB_TEST_TOKEN={other:?}: use softhsm or kryoptic"),
        }
    }

    impl Kind {
        pub fn name(self) -> &'static str {
            match self {
                Kind::SoftHsm => "softhsm",
                Kind::Kryoptic => "kryoptic",
            }
        }

        /// The module's path (`PROGRESSDB_TEST_PKCS11_MODULE` overrides it); a missing module
        /// fails the test, saying how to get it.
        pub fn module(self) -> PathBuf {
            let path = std::env::var_os("PROGRESSDB_TEST_PKCS11_MODULE")
                .map(PathBuf::from)
                .unwrap_or_else(|| match self {
                    Kind::SoftHsm => PathBuf::from(SOFTHSM_MODULE),
                    Kind::Kryoptic => Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../../target/kryoptic/libkryoptic_pkcs11.so"),
                });
            assert!(
                path.exists(),
                "PKCS#11 module {} not found: {}",
                path.display(),
                match self {
                    Kind::SoftHsm => "install softhsm2 (scripts/test.sh does)",
                    Kind::Kryoptic => "run scripts/build-kryoptic.sh (scripts/test.sh does)",
                }
            );
            path
        }

        /// The environment variable that points the module at its config file.
        pub fn conf_var(self) -> &'static str {
            match self {
                Kind::SoftHsm => "SOFTHSM2_CONF",
                Kind::Kryoptic => "KRYOPTIC_CONF",
            }
        }

        /// Writes the module's config at `conf`, with its tokens in `tokendir`. For Kryoptic
        /// (one slot per token, each its own SQLite file) the slots are those whose files are
        /// in `tokendir`, so pointing a config at an empty directory removes every token, as
        /// for SoftHSM.
        pub fn write_conf(self, conf: &Path, tokendir: &Path) {
            match self {
                Kind::SoftHsm => fs::write(
                    conf,
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                        tokendir.display()
                    ),
                )
                .unwrap(),
                Kind::Kryoptic => {
                    let mut slots: Vec<u32> = fs::read_dir(tokendir)
                        .map(|d| {
                            d.flatten()
                                .filter_map(|e| {
                                    let name = e.file_name().into_string().ok()?;
                                    name.strip_prefix("slot-")?.strip_suffix(".sql")?.parse().ok()
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    slots.sort_unstable();
                    let mut text = format!("# tokendir = {}\n", tokendir.display());
                    for n in slots {
                        text.push_str(&format!(
                            "\n[[slots]]\nslot = {n}\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
                            tokendir.join(format!("slot-{n}.sql")).display()
                        ));
                    }
                    fs::write(conf, text).unwrap();
                }
            }
        }

        /// Initialises a token labelled `label` in a new slot of `conf`; returns its random
        /// user PIN.
        pub fn init_token(self, conf: &Path, label: &str) -> String {
            let pin = random_hex(8);
            let so_pin = random_hex(8);
            match self {
                Kind::SoftHsm => {
                    let out = Command::new("softhsm2-util")
                        .env("SOFTHSM2_CONF", conf)
                        .args(["--init-token", "--free", "--label", label])
                        .args(["--pin", &pin, "--so-pin", &so_pin])
                        .output()
                        .expect("softhsm2-util not found: install softhsm2 (scripts/test.sh does)");
                    assert!(
                        out.status.success(),
                        "softhsm2-util --init-token {label} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Kind::Kryoptic => {
                    let text = fs::read_to_string(conf).unwrap();
                    let tokendir = PathBuf::from(
                        text.lines()
                            .find_map(|l| l.strip_prefix("# tokendir = "))
                            .expect("a Kryoptic config written by write_conf"),
                    );
                    let slot = (1..)
                        .find(|n| !tokendir.join(format!("slot-{n}.sql")).exists())
                        .unwrap();
                    // The slot's file must exist for write_conf to list it.
                    fs::write(tokendir.join(format!("slot-{slot}.sql")), b"").unwrap();
                    self.write_conf(conf, &tokendir);
                    let module = self.module();
                    let tool = |args: &[&str]| {
                        let out = Command::new("pkcs11-tool")
                            .env("KRYOPTIC_CONF", conf)
                            .arg("--module")
                            .arg(&module)
                            .args(["--slot", &slot.to_string()])
                            .args(args)
                            .output()
                            .expect("pkcs11-tool not found: install opensc (scripts/test.sh does)");
                        assert!(
                            out.status.success(),
                            "pkcs11-tool {args:?} for {label} failed: {}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        );
                    };
                    tool(&["--init-token", "--label", label, "--so-pin", &so_pin]);
                    tool(&[
                        "--login",
                        "--login-type",
                        "so",
                        "--so-pin",
                        &so_pin,
                        "--init-pin",
                        "--pin",
                        &pin,
                    ]);
                }
            }
            pin
        }
    }

    /// One initialised token with its config and a 0600 user-PIN file.
    #[derive(Debug, Clone)]
    pub struct Token {
        pub kind: Kind,
        pub module: PathBuf,
        /// The config file, named by [`Kind::conf_var`] in the environment of every process
        /// that loads the module.
        pub conf: PathBuf,
        pub conf_var: &'static str,
        pub label: String,
        pub pin: String,
        pub pin_file: PathBuf,
    }

    impl Token {
        /// The usual token of a test under `root`: `root/softhsm/`, labelled
        /// [`crate::kms::TOKEN_LABEL`] (what a [`crate::kms::KmsBuilder`] makes when it is
        /// given none; make one with this to share it among several KMSs or tools).
        pub fn new(root: &Path) -> Self {
            Self::create(&root.join("softhsm"), crate::kms::TOKEN_LABEL)
        }

        /// Creates a config in `dir`, a token directory `dir/tokens/`, a token labelled
        /// `label` and `dir/user-pin`, on this run's [`kind`].
        pub fn create(dir: &Path, label: &str) -> Self {
            let kind = kind();
            let module = kind.module();
            let tokens = dir.join("tokens");
            fs::create_dir_all(&tokens).unwrap();
            let conf = dir.join(match kind {
                Kind::SoftHsm => "softhsm2.conf",
                Kind::Kryoptic => "kryoptic.conf",
            });
            kind.write_conf(&conf, &tokens);
            let pin = kind.init_token(&conf, label);
            let pin_file = dir.join("user-pin");
            write_secret(&pin_file, format!("{pin}\n").as_bytes());
            Self {
                kind,
                module,
                conf,
                conf_var: kind.conf_var(),
                label: label.to_owned(),
                pin,
                pin_file,
            }
        }
    }
}

/// TLS material made with rcgen: a CA, a server certificate for localhost/127.0.0.1, a client
/// certificate, and an unrelated CA with a client certificate of its own.
#[derive(Debug, Clone)]
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from the same CA for the subject `kms-admin`.
    pub admin_client_cert: PathBuf,
    pub admin_client_key: PathBuf,
    pub other_ca: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
    /// Client certificates from the right CA that must still be refused: expired, not valid
    /// yet, and one made for servers only (`serverAuth` extended key usage).
    pub expired_client: (PathBuf, PathBuf),
    pub future_client: (PathBuf, PathBuf),
    pub server_only_client: (PathBuf, PathBuf),
}

fn make_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    (p.self_signed(&key).unwrap(), key)
}

fn make_leaf(
    sans: &[&str],
    cn: &str,
    eku: rcgen::ExtendedKeyUsagePurpose,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
) -> (String, String) {
    make_leaf_valid(sans, cn, eku, ca, None)
}

/// A date: year, month, day.
type Ymd = (i32, u8, u8);

/// A leaf certificate; `validity` (not before, not after) overrides rcgen's default span.
fn make_leaf_valid(
    sans: &[&str],
    cn: &str,
    eku: rcgen::ExtendedKeyUsagePurpose,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    validity: Option<(Ymd, Ymd)>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut p = rcgen::CertificateParams::new(sans).unwrap();
    if let Some(((y0, m0, d0), (y1, m1, d1))) = validity {
        p.not_before = rcgen::date_time_ymd(y0, m0, d0);
        p.not_after = rcgen::date_time_ymd(y1, m1, d1);
    }
    p.distinguished_name
        .push(rcgen::DnType::CommonName, cn.to_owned());
    p.extended_key_usages = vec![eku];
    let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Certs {
    /// Writes every file into `dir` (created if missing); private keys are 0600.
    pub fn generate(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap();
        let ca = make_ca("progressdb test CA");
        let other = make_ca("unrelated CA");
        let (server_cert, server_key) = make_leaf(
            &["localhost", "127.0.0.1"],
            "progressdb-kms",
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        let (client_cert, client_key) = make_leaf(
            &["progressdb"],
            "progressdb",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        );
        let (a_cert, a_key) = make_leaf(
            &["kms-admin"],
            "kms-admin",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        );
        let (o_cert, o_key) = make_leaf(
            &["intruder"],
            "intruder",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &other,
        );
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let expired = make_leaf_valid(
            &["progressdb"],
            "progressdb",
            ClientAuth,
            &ca,
            Some(((2001, 1, 1), (2002, 1, 1))),
        );
        let future = make_leaf_valid(
            &["progressdb"],
            "progressdb",
            ClientAuth,
            &ca,
            Some(((2090, 1, 1), (2091, 1, 1))),
        );
        let server_only = make_leaf(&["progressdb"], "progressdb", ServerAuth, &ca);
        let pair = |name: &str, (cert, key): (String, String)| {
            let (c, k) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            fs::write(&c, cert).unwrap();
            write_secret(&k, key.as_bytes());
            (c, k)
        };
        let expired_client = pair("expired-client", expired);
        let future_client = pair("future-client", future);
        let server_only_client = pair("server-only-client", server_only);
        let c = Certs {
            expired_client,
            future_client,
            server_only_client,
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            admin_client_cert: dir.join("admin-client.pem"),
            admin_client_key: dir.join("admin-client.key"),
            other_ca: dir.join("other-ca.pem"),
            other_client_cert: dir.join("other-client.pem"),
            other_client_key: dir.join("other-client.key"),
        };
        fs::write(&c.ca, ca.0.pem()).unwrap();
        fs::write(&c.other_ca, other.0.pem()).unwrap();
        fs::write(&c.server_cert, server_cert).unwrap();
        write_secret(&c.server_key, server_key.as_bytes());
        fs::write(&c.client_cert, client_cert).unwrap();
        write_secret(&c.client_key, client_key.as_bytes());
        fs::write(&c.admin_client_cert, a_cert).unwrap();
        write_secret(&c.admin_client_key, a_key.as_bytes());
        fs::write(&c.other_client_cert, o_cert).unwrap();
        write_secret(&c.other_client_key, o_key.as_bytes());
        c
    }
}

/// The encodings of `secret` that could show up in a log or a file: raw, hex (both cases),
/// standard and URL-safe base64 at each of the three byte alignments it can have inside a
/// longer encoded string (the characters that mix in neighbouring bytes are left out).
pub fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
    ];
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
    ] {
        for k in 0..3usize {
            let mut buf = vec![0u8; k];
            buf.extend_from_slice(secret);
            let enc = engine.encode(&buf).into_bytes();
            let start = if k == 0 { 0 } else { 4 };
            let end = enc.len().saturating_sub(4);
            if end > start + 8 {
                out.push(enc[start..end].to_vec());
            }
        }
    }
    out
}

/// Panics if `hay` (named `what` in the message) holds any encoding of any of `secrets`.
/// The message shows where, with the secret itself blanked out.
pub fn assert_absent(what: &str, hay: &[u8], secrets: &[&[u8]]) {
    for s in secrets {
        assert!(s.len() >= 6, "secret too short to search for");
        for e in encodings(s) {
            if let Some(pos) = hay.windows(e.len()).position(|w| w == e.as_slice()) {
                let from = pos.saturating_sub(120);
                let to = (pos + e.len() + 120).min(hay.len());
                panic!(
                    "{what} holds a secret at byte {pos}: ...{}<secret>{}...",
                    String::from_utf8_lossy(&hay[from..pos]),
                    String::from_utf8_lossy(&hay[pos + e.len()..to])
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_secret_in_every_encoding_and_alignment() {
        let secret = b"pin-0123456789";
        for prefix in 0..3 {
            let mut data = vec![b'x'; prefix];
            data.extend_from_slice(secret);
            data.extend_from_slice(b"tail");
            for hay in [
                base64::engine::general_purpose::STANDARD.encode(&data),
                base64::engine::general_purpose::URL_SAFE.encode(&data),
                hex::encode(&data),
            ] {
                let r = std::panic::catch_unwind(|| assert_absent("t", hay.as_bytes(), &[secret]));
                assert!(r.is_err(), "missed the secret in {hay}");
            }
        }
        assert_absent("t", b"nothing to see here at all", &[secret]);
    }
}
