//! Private PostgreSQL clusters for tests: `initdb` in a temp dir, the server listening only on
//! a Unix socket in that dir (and, when asked, on a loopback TCP port), run by a watchdog that
//! stops it when the test process ends, however it ends. No machine-wide service is used.
//!
//! The binaries come from Debian's `postgresql` package (`scripts/ensure-deps.sh` installs it).
//! PostgreSQL refuses to run as root: under root the cluster belongs to the `postgres` user the
//! package creates, and the server is started through `setpriv`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The superuser every cluster is made with (trust authentication on its own socket).
pub const SUPERUSER: &str = "kms";

/// The directory of the newest installed PostgreSQL's binaries.
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             run scripts/ensure-deps.sh or `apt-get install -y postgresql`"
        )
    })
}

fn as_root() -> bool {
    // The effective uid, read from /proc (no libc call needed).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `cmd` run as the cluster's owner: `postgres` under root, this user otherwise.
fn owner_cmd(program: &Path) -> Command {
    if as_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_owner(path: &Path) {
    if as_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "cannot give {} to the postgres user (is the postgresql package installed?)",
            path.display()
        );
    }
}

/// One cluster. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    tcp: bool,
    settings: Vec<String>,
    /// The watchdog of the running server, reaped once the server stops.
    watchdog: std::sync::Mutex<Option<std::process::Child>>,
}

impl PgCluster {
    /// A new cluster on its own socket, started and ready.
    pub fn start() -> Self {
        Self::start_with(false, &[])
    }

    /// A new cluster, also on `127.0.0.1:<port>` when `tcp`, with extra `-c name=value`
    /// server settings.
    pub fn start_with(tcp: bool, settings: &[&str]) -> Self {
        let c = Self::create(tcp, settings);
        c.start_server();
        c
    }

    /// A new cluster that also listens on `127.0.0.1:<port>` (and `localhost`) with TLS only:
    /// the server certificate and key of `certs`, TCP clients authenticated by password
    /// (SCRAM) as the superuser with `password`, plain-text TCP refused. The Unix socket
    /// stays password-less for the test's own `psql`.
    pub fn start_tls(certs: &crate::Certs, password: &str) -> Self {
        let c = Self::create(
            true,
            &[
                "ssl=on",
                "ssl_cert_file=server.pem",
                "ssl_key_file=server.key",
                "password_encryption=scram-sha-256",
            ],
        );
        let data = c.data_dir();
        std::fs::copy(&certs.server_cert, data.join("server.pem")).unwrap();
        std::fs::copy(&certs.server_key, data.join("server.key")).unwrap();
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n\
             host all all 0.0.0.0/0 reject\n\
             host all all ::/0 reject\n",
        )
        .unwrap();
        chown_to_owner(&data);
        c.start_server();
        c.psql(
            "postgres",
            &format!(
                "ALTER ROLE {SUPERUSER} PASSWORD '{}'",
                password.replace('\'', "''")
            ),
        );
        c
    }

    /// A libpq connection string for `dbname` over TCP to `localhost` (no password in it).
    pub fn tcp_url(&self, dbname: &str) -> String {
        format!(
            "host=localhost port={} user={SUPERUSER} dbname={dbname}",
            self.port
        )
    }

    /// The superuser, for connection strings built by hand.
    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    fn create(tcp: bool, settings: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir()
            .expect("temp dir for a PostgreSQL cluster");
        std::fs::create_dir(dir.path().join("data")).unwrap();
        chown_to_owner(dir.path());
        // The temp dir is 0700: the postgres user must reach its socket and data.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let out = owner_cmd(&bin_dir().join("initdb"))
            .args(["--no-sync", "--auth=trust", "--encoding=UTF8", "--locale=C"])
            .arg(format!("--username={SUPERUSER}"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir,
            port: crate::free_port(),
            tcp,
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
            watchdog: std::sync::Mutex::new(None),
        }
    }

    /// The one cluster of this test process, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// The directory the socket is in.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (for tests that look at or plant files).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (again, after [`PgCluster::stop`]) under a watchdog that stops it
    /// when this process exits, and waits until it accepts connections.
    pub fn start_server(&self) {
        let mut args = vec![
            "-D".to_owned(),
            self.data_dir().display().to_string(),
            "-k".to_owned(),
            self.dir.path().display().to_string(),
            "-p".to_owned(),
            self.port.to_string(),
            "-c".to_owned(),
            format!(
                "listen_addresses={}",
                if self.tcp { "127.0.0.1" } else { "" }
            ),
            "-c".to_owned(),
            "max_connections=200".to_owned(),
        ];
        for s in &self.settings {
            args.push("-c".to_owned());
            args.push(s.clone());
        }
        let server = owner_cmd(&bin_dir().join("postgres"));
        let program = server.get_program().to_owned();
        let prefix: Vec<String> = server
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let log = self.dir.path().join("server.log");
        // The watchdog: the server runs as long as this process does (polled), and gets a
        // fast shutdown (SIGINT) when it is gone.
        // Once the test process is gone, the cluster's directory goes too.
        let script = r#"
            prog="$1"; log="$2"; parent="$3"; dir="$4"; shift 4
            "$prog" "$@" >>"$log" 2>&1 &
            pg=$!
            while kill -0 "$parent" 2>/dev/null && kill -0 "$pg" 2>/dev/null; do sleep 0.2; done
            kill -INT "$pg" 2>/dev/null
            wait "$pg"
            kill -0 "$parent" 2>/dev/null || rm -rf "$dir"
        "#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("pg-watchdog")
            .arg(&program)
            .arg(&log)
            .arg(std::process::id().to_string())
            .arg(self.dir.path())
            .args(prefix)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the PostgreSQL watchdog");
        *self.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(bin_dir().join("pg_isready"))
                .arg("-h")
                .arg(self.dir.path())
                .arg("-p")
                .arg(self.port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The postmaster's pid, from `postmaster.pid`, while it runs.
    pub fn server_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops the server (fast shutdown: sessions are cut, committed work is kept) and waits
    /// until it is gone.
    pub fn stop(&self) {
        let Some(pid) = self.server_pid() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The watchdog ends with its server.
        if let Some(mut w) = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = w.wait();
        }
    }

    /// A libpq connection string for `dbname` on the socket.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={dbname}",
            self.dir.path().display(),
            self.port
        )
    }

    /// Runs `sql` with `psql` as the superuser in `dbname`; panics on failure.
    pub fn psql(&self, dbname: &str, sql: &str) -> String {
        let out = Command::new(bin_dir().join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .arg("-d")
            .arg(self.url(dbname))
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new empty database; returns its connection string.
    pub fn new_database(&self) -> String {
        let name = format!("kms_{}", crate::random_hex(6));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }
}

impl PgCluster {
    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
