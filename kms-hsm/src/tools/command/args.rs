//! The arguments of every `progressdb-kms` subcommand (clap derive).

use super::*;

#[derive(Debug, Parser)]
#[command(
    name = "progressdb-kms",
    version,
    about = "HSM-backed key management service for progressdb"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the KMS.
    Serve {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Create the KEK in the HSM token if it does not exist yet (idempotent).
    InitKek {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config and the files and token it names without starting: every key,
    /// socket and store directories, TLS files, the PIN file's mode, the module, the token,
    /// the PIN (one login), the KEK and the audit key. One line per finding; exit 2 when
    /// there is a problem. Needs no running KMS.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Do not log in to the token (no PIN, KEK or audit-key check): for a check before
        /// every start, where a wrong PIN must not cost the token a second failed login.
        #[arg(long)]
        no_login: bool,
    },
    /// Show KEK versions, DEK counts per version, the DEK cache, the HSM workers and
    /// lifecycle jobs (needs the running KMS).
    Status {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the KEK: make a new version in the HSM, rewrap every DEK to it in the
    /// background, verify them all, then retire the old versions (needs the running KMS).
    /// Started twice, it returns the rotation already running.
    RotateKek {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Return once the job is started instead of waiting for it to end.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Unwrap every active DEK under its KEK and count them per version; changes nothing
    /// (needs the running KMS).
    Verify {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Return once the job is started instead of waiting for it to end.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List lifecycle jobs, or show one (needs the running KMS).
    Jobs {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// One job's id (`job-...`).
        #[arg(long)]
        id: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// KEK version management (needs the running KMS).
    Kek {
        #[command(subcommand)]
        command: KekCommand,
    },
    /// Write every key record (wrapped DEKs and metadata, tombstones included) to FILE, in a
    /// versioned file protected by an HMAC made in the HSM (needs the running KMS).
    Backup {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Where to write it (mode 0600; replaced atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Import a backup into the store, never overwriting: missing records are added,
    /// differing ones reported, destroyed keys stay destroyed unless named with
    /// --resurrect, including keys destroyed after the backup was made (found in the store's
    /// audit log, or in --audit when the store lost it). A file that does not verify is
    /// refused whole (needs the running KMS).
    Restore {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The backup file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// A destroyed key to bring back from the backup (repeatable).
        #[arg(long, value_name = "KEY_ID")]
        resurrect: Vec<String>,
        /// The audit log exported since the backup (JSON lines, as `audit list` prints
        /// them), for a store whose own log does not continue the backup's.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "accept_unchecked_destroys"
        )]
        audit: Option<PathBuf>,
        /// Restore without knowing which keys were destroyed after the backup: they come
        /// back. Only when no audit log since the backup survives.
        #[arg(long)]
        accept_unchecked_destroys: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild lost key records from the server's copies of its threads' keys (FILE: the
    /// server's `GET /admin/kms/key-copies` answer). Each copy must unwrap in the HSM; the
    /// threads that cannot be recovered are listed (needs the running KMS).
    ImportCopies {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The server's `GET /admin/kms/key-copies` answer, saved to a file.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// OFFLINE (stop the KMS first; refused while it runs): rewrite the key store without its
    /// free pages, so the wrapped DEKs of destroyed keys no longer exist in its files.
    Compact {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// The tamper-evident audit log (needs the running KMS: the MACs are made in the HSM).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Key-store maintenance.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// OFFLINE (stop every KMS on the source first): copy every key record, KEK-version
    /// record, lifecycle job and the audit log from one key store into a new, empty one
    /// (LMDB to PostgreSQL or back), then read both again and check they are equal.
    Copy {
        /// TOML configuration file (its [store] gives the PostgreSQL password file, CA file
        /// and timeout for a postgres side).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The source: lmdb:PATH or postgres:URL.
        #[arg(long, value_name = "STORE")]
        from: String,
        /// The target, which must be empty: lmdb:PATH or postgres:URL.
        #[arg(long, value_name = "STORE")]
        to: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every entry's HMAC chain and the recorded head; names the first bad entry
    /// (edited, removed, inserted, reordered) or a truncated tail. Exit 1 when not intact.
    Verify {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print entries as JSON lines.
    List {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Remove the entries an archive holds (and the tombstones of the keys destroyed by
    /// then) from the key store, once the archive is kept off the host. The archive is the
    /// JSON lines of `audit list` (scripts/export-audit.sh); the store must hold its last
    /// entry with the same MAC, and the chain up to it must verify.
    Compact {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The archive: every entry from the first one the store still holds through its last.
        #[arg(long, value_name = "FILE")]
        archive: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KekCommand {
    /// Remove a retired KEK version from the HSM. Refused while it is current, not retired
    /// by a completed rotation, or any key record still depends on it.
    Destroy {
        /// TOML configuration file (the admin socket is found from it).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The version to destroy.
        #[arg(long)]
        version: u32,
    },
}
