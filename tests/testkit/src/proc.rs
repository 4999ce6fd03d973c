//! Child processes under test: where the binaries are, one [`Proc`] per running service (its
//! output appended to a log file, killed on drop), and the events a harness waits on instead of
//! a clock: the TCP port a process bound ([`listening_port`]) and its exit
//! ([`Proc::signal_and_wait`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the service binaries the end-to-end tests start: `E2E_BIN_DIR` (set by
/// `scripts/test.sh`, which builds both server flavours there), else `target/e2e/` next to the
/// running test binary.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("E2E_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test-binary> -> target/e2e
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|t| t.join("e2e"))
        .expect("target dir")
}

/// A binary under test in [`bin_dir`]: `progressdb-kms`, `progressdb` (default features) or
/// `progressdb-dev` (built with `--features dev-embedded`). A missing one fails the test,
/// saying how to build it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: run scripts/test.sh, which builds the binaries into target/e2e/ \
         (or set E2E_BIN_DIR; docs/testing.md)",
        p.display()
    );
    p
}

/// The log filter the services run with: `PROGRESSDB_E2E_LOG` (e.g. `trace`, for a test that
/// scans every line), default `debug`.
pub fn log_level() -> String {
    std::env::var("PROGRESSDB_E2E_LOG").unwrap_or_else(|_| "debug".into())
}

/// A child process whose stdout and stderr are appended to a log file; killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` (stdin closed, stdout and stderr appended to `log`).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            name: name.into(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// A handle with no process yet (its log file named), for a harness that starts it later.
    pub fn none(name: &str, log: &Path) -> Self {
        Self {
            name: name.into(),
            child: None,
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Sends `sig` and waits (at most 20 s) for the process to exit.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(Duration::from_secs(20))
    }

    /// Sends `sig` without waiting.
    pub fn signal(&self, sig: i32) {
        let child = self.child.as_ref().expect("process already stopped");
        // Sending a signal to our own child, whose pid cannot have been reused: we have not
        // reaped it yet.
        let rc = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(rc.success(), "kill -{sig} {} failed", self.name);
    }

    /// Waits for the process to exit (at most `timeout`, then it is killed and the test
    /// fails) and reaps it.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("process already stopped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {timeout:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs (reaping it when it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Stops the process with SIGTERM if it still runs (before starting it again: the old
    /// one must have let go of its store and sockets).
    pub fn stop_if_running(&mut self) {
        if self.is_running() {
            self.sigterm();
        } else {
            self.child.take().map(|mut c| c.wait());
        }
    }

    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    pub fn sigkill(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL)
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait().unwrap() {
                panic!("{} exited with {st}:\n{}", self.name, self.log_text());
            }
        }
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Appends `bytes` to the log (the output of a one-shot command run on the same service).
    pub fn append_log(&self, bytes: &[u8]) {
        use std::io::Write as _;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    /// Waits until the process listens on exactly one TCP port on 127.0.0.1 and returns it:
    /// for a service configured with port 0, which binds a free port itself (no window in
    /// which another process could take a port picked for it). Fails the test with the log
    /// when the process exits first or nothing listens within 30 s.
    pub fn wait_tcp_port(&mut self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.assert_running();
            let ports = listening_ports(self.pid());
            match ports.as_slice() {
                [p] => return *p,
                [] => {}
                many => panic!("{} listens on several ports: {many:?}", self.name),
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on a TCP port within 30 s:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The TCP ports process `pid` listens on (IPv4 and IPv6), read from `/proc`: the socket
/// inodes among its file descriptors, matched against the kernel's table of listening sockets.
pub fn listening_ports(pid: i32) -> Vec<u16> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<String> = fds
        .flatten()
        .filter_map(|e| {
            let link = fs::read_link(e.path()).ok()?;
            let s = link.to_str()?;
            Some(s.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() < 10 || cols[3] != "0A" || !inodes.iter().any(|i| i == cols[9]) {
                continue;
            }
            if let Some(port) = cols[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok())
            {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
        }
    }
    ports
}
