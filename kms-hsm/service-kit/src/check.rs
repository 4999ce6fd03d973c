//! `check-config` for both binaries: a [`Report`] of findings about a configuration and the
//! files it names, made without starting the service, and the checks both binaries share
//! (secret files, store directories, socket directories).
//!
//! Each finding is one line naming the key (and the file) at fault and, for a problem, the
//! fix: `problem: hsm.pin_file /etc/kms/pin: mode 0644 is readable by group or others; fix:
//! chmod 600 /etc/kms/pin`. The process exits 0 when there is no problem (warnings allowed)
//! and 2 otherwise. No finding ever carries a secret's content.

use std::fmt;
use std::path::Path;

use crate::secret_file::{self, SecretFileError};

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Checked and fine.
    Ok,
    /// Works, but is probably not what production wants.
    Warning,
    /// The service would refuse to start or fail at its first request.
    Problem,
}

/// One line of a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// The key (and file) concerned, e.g. `hsm.pin_file /etc/kms/pin`.
    pub subject: String,
    pub message: String,
    /// What to do (problems and warnings).
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Problem => "problem",
        };
        write!(f, "{tag}: {}: {}", self.subject, self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// The findings of one `check-config` run, in the order they were made.
#[derive(Clone, Debug, Default)]
pub struct Report {
    findings: Vec<Finding>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, severity: Severity, subject: String, message: String, fix: Option<String>) {
        // One line each, whatever the underlying error printed.
        let one = |s: String| crate::config::one_line(&s);
        self.findings.push(Finding {
            severity,
            subject: one(subject),
            message: one(message),
            fix: fix.map(one),
        });
    }

    pub fn ok(&mut self, subject: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Ok, subject.into(), message.into(), None);
    }

    pub fn warn(
        &mut self,
        subject: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(
            Severity::Warning,
            subject.into(),
            message.into(),
            Some(fix.into()),
        );
    }

    pub fn problem(
        &mut self,
        subject: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(
            Severity::Problem,
            subject.into(),
            message.into(),
            Some(fix.into()),
        );
    }

    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    pub fn problems(&self) -> usize {
        self.count(Severity::Problem)
    }

    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }

    fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }

    /// Every finding, one per line, then a summary line.
    pub fn render(&self, config: &Path) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&f.to_string());
            out.push('\n');
        }
        let verdict = if self.problems() == 0 { "OK" } else { "NOT OK" };
        out.push_str(&format!(
            "{}: {verdict} ({} problems, {} warnings)\n",
            config.display(),
            self.problems(),
            self.warnings()
        ));
        out
    }

    /// 0 without problems, 2 with.
    pub fn exit_code(&self) -> u8 {
        if self.problems() == 0 {
            0
        } else {
            2
        }
    }

    /// The outcome of loading the config file at `path`: its value, or `None` with the
    /// loader's one-line reason as a problem (nothing else can be checked then).
    pub fn config<T, E: fmt::Display>(&mut self, path: &Path, loaded: Result<T, E>) -> Option<T> {
        let subject = path.display().to_string();
        match loaded {
            Ok(c) => {
                self.ok(subject, "every key parses and is in range");
                Some(c)
            }
            Err(e) => {
                self.problem(
                    subject,
                    e.to_string(),
                    "correct the key named, see docs/configuration.md",
                );
                None
            }
        }
    }

    /// A store directory (`store.path`): writable (see [`Report::writable_dir`]), and whether
    /// another process holds its lock file `lock_name` (a warning: it may be the running
    /// service).
    pub fn store_dir(&mut self, dir: &Path, lock_name: &str) {
        self.writable_dir("store.path", dir);
        if dir.is_dir() {
            match crate::lmdb::lock_store(dir, lock_name) {
                Ok(_lock) => self.ok("store.path", "not in use by another process"),
                Err(e) => self.warn(
                    format!("store.path {}", dir.display()),
                    e,
                    "fine if this is the running service; otherwise stop the other process",
                ),
            }
        }
    }

    /// A PostgreSQL store (`store.url`): its password file and CA read, and, when `connect`,
    /// one connection (as `app`) that reads the schema version and applies no migration.
    pub fn postgres_store(
        &mut self,
        pg: &crate::postgres::PostgresConfig,
        schema: &crate::postgres::Schema,
        app: &str,
        connect: bool,
    ) {
        if let Some(f) = &pg.password_file {
            if !self.secret_file("store.password_file", f) {
                return;
            }
        }
        if let Err(e) = pg.tls_client_config() {
            self.problem(
                "store.ca_file",
                e,
                "point it at the PEM certificate of the database's CA",
            );
            return;
        }
        if !connect {
            return;
        }
        let target = pg.display_target();
        match schema.probe(pg, app) {
            Ok(version) => self.ok(
                format!("store.url {target}"),
                format!(
                    "connected; schema version {version} (this binary knows {})",
                    schema.newest()
                ),
            ),
            Err(e) => self.problem(
                format!("store.url {target}"),
                e,
                "check the database is up, reachable, and that the user and password are right",
            ),
        }
    }

    /// A secret file named by `key`: present, a regular file, mode 0600 or stricter,
    /// readable, not empty. Returns whether it passed.
    pub fn secret_file(&mut self, key: &str, path: &Path) -> bool {
        let subject = format!("{key} {}", path.display());
        match secret_file::read_secret_bytes(path) {
            Ok(b) if b.iter().all(u8::is_ascii_whitespace) => {
                self.problem(subject, "is empty", "write the secret into it");
                false
            }
            Ok(_) => {
                self.ok(subject, "secret file present, mode 0600 or stricter");
                true
            }
            Err(SecretFileError::Permissions { mode, .. }) => {
                self.problem(
                    subject,
                    format!("mode {mode:04o} is readable by group or others"),
                    format!("chmod 600 {}", path.display()),
                );
                false
            }
            Err(SecretFileError::NotAFile { .. }) => {
                self.problem(
                    subject,
                    "is not a regular file",
                    "point it at the secret file",
                );
                false
            }
            Err(SecretFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                self.problem(
                    subject,
                    "does not exist",
                    "create it (mode 0600) or fix the path",
                );
                false
            }
            Err(e) => {
                self.problem(
                    subject,
                    e.to_string(),
                    "make it readable by the service user only",
                );
                false
            }
        }
    }

    /// A directory the service creates files in (`key` names it): it exists and is writable
    /// (a probe file is created and removed), or it does not exist yet and its nearest
    /// existing ancestor is writable (the service creates it).
    pub fn writable_dir(&mut self, key: &str, dir: &Path) {
        let subject = format!("{key} {}", dir.display());
        if dir.is_dir() {
            match probe_write(dir) {
                Ok(()) => self.ok(subject, "directory exists and is writable"),
                Err(e) => self.problem(
                    subject,
                    format!("directory is not writable by this user: {e}"),
                    "run as the service user, or chown/chmod the directory",
                ),
            }
            return;
        }
        if dir.exists() {
            self.problem(
                subject,
                "exists but is not a directory",
                "remove it or choose another path",
            );
            return;
        }
        let mut parent = dir.parent();
        while let Some(p) = parent {
            if p.is_dir() {
                match probe_write(p) {
                    Ok(()) => self.ok(
                        subject,
                        format!(
                            "does not exist yet; {} is writable, so it will be created",
                            p.display()
                        ),
                    ),
                    Err(e) => self.problem(
                        subject,
                        format!("does not exist and {} is not writable: {e}", p.display()),
                        format!("create {} owned by the service user", dir.display()),
                    ),
                }
                return;
            }
            parent = p.parent();
        }
        self.problem(
            subject,
            "no existing parent directory",
            "use an absolute path on an existing file system",
        );
    }

    /// The directory a Unix socket `key` is created in: it must exist and be writable (the
    /// services do not create socket directories).
    /// A Unix socket's directory (`key` names the socket): it exists, is not writable by
    /// every user ([`unsafe_socket_dir`]) and is writable by this user.
    pub fn socket_dir(&mut self, key: &str, socket: &Path) {
        let subject = format!("{key} {}", socket.display());
        let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
            self.problem(subject, "has no directory", "use an absolute socket path");
            return;
        };
        if socket.as_os_str().len() > 107 {
            self.problem(
                subject,
                format!(
                    "is {} bytes long; Unix socket paths are limited to 107",
                    socket.as_os_str().len()
                ),
                "choose a shorter path, e.g. under /run",
            );
            return;
        }
        if !dir.is_dir() {
            self.problem(
                subject,
                format!("directory {} does not exist", dir.display()),
                format!(
                    "create it owned by the service user (systemd: RuntimeDirectory=), e.g. install -d -m 0750 {}",
                    dir.display()
                ),
            );
            return;
        }
        if let Some(why) = unsafe_socket_dir(dir) {
            self.problem(
                subject,
                why,
                format!(
                    "use a directory only the service's user and group can write, e.g. install -d -m 0750 {}",
                    dir.display()
                ),
            );
            return;
        }
        match probe_write(dir) {
            Ok(()) => self.ok(subject, "socket directory exists and is writable"),
            Err(e) => self.problem(
                subject,
                format!(
                    "directory {} is not writable by this user: {e}",
                    dir.display()
                ),
                "run as the service user, or chown the directory to it",
            ),
        }
    }
}

/// Creates and removes a probe file in `dir`.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".check-config-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    drop(f);
    std::fs::remove_file(&probe)
}

/// Why `dir` must not hold a service's socket, if it must not: a directory every user can
/// write (mode `o+w`, sticky or not, like `/tmp`) lets another user plant a socket at the path
/// before the service starts, or (without the sticky bit) replace the service's socket with
/// its own. `None` when the directory is safe or cannot be read (binding then reports that).
pub fn unsafe_socket_dir(dir: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode();
    (mode & 0o002 != 0).then(|| {
        format!(
            "directory {} is writable by every user (mode {:o}): another user could plant or replace the socket",
            dir.display(),
            mode & 0o7777
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn findings_are_one_line_with_the_key_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut r = Report::new();
        assert!(!r.secret_file("hsm.pin_file", &pin));
        let line = r.findings()[0].to_string();
        assert!(line.starts_with("problem: hsm.pin_file "), "{line}");
        assert!(
            line.contains("mode 0644") && line.contains("fix: chmod 600"),
            "{line}"
        );
        assert!(!line.contains("1234"), "no secret content: {line}");
        assert_eq!(r.exit_code(), 2);

        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut r = Report::new();
        assert!(r.secret_file("hsm.pin_file", &pin));
        r.secret_file("auth.keys_file", &dir.path().join("absent"));
        assert_eq!(r.problems(), 1);
        assert!(r.findings()[1].to_string().contains("does not exist"));
        let text = r.render(Path::new("x.toml"));
        assert!(
            text.ends_with("x.toml: NOT OK (1 problems, 0 warnings)\n"),
            "{text}"
        );
    }

    #[test]
    fn directories_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Report::new();
        r.writable_dir("store.path", dir.path());
        r.writable_dir("store.path", &dir.path().join("a/b"));
        r.socket_dir("listen.unix", &dir.path().join("kms.sock"));
        assert_eq!(r.problems(), 0, "{:?}", r.findings());
        r.socket_dir("listen.unix", &dir.path().join("missing/kms.sock"));
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        r.writable_dir("store.path", &file);
        assert_eq!(r.problems(), 2);
        assert!(r.findings()[3]
            .to_string()
            .contains("does not exist; fix: create it"));
        // No probe file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);

        // A directory every user may write is refused, with the sticky bit too (/tmp).
        use std::os::unix::fs::PermissionsExt as _;
        for mode in [0o777, 0o1777, 0o733] {
            let open = dir.path().join(format!("open{mode:o}"));
            std::fs::create_dir(&open).unwrap();
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(mode)).unwrap();
            let mut r = Report::new();
            r.socket_dir("listen.unix", &open.join("kms.sock"));
            assert_eq!(r.problems(), 1, "{mode:o}");
            assert!(
                r.findings()[0]
                    .to_string()
                    .contains("writable by every user"),
                "{}",
                r.findings()[0]
            );
        }
        assert!(unsafe_socket_dir(dir.path()).is_none());
    }
}
