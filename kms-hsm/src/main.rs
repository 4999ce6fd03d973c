//! `progressdb-kms`: parse the command line, load the config, start logging, run.
//!
//! * `progressdb-kms serve --config FILE`
//! * `progressdb-kms init-kek --config FILE`
//! * admin subcommands, clients of the running KMS's admin socket ([`progressdb_kms::cli`]):
//!   `status`, `rotate-kek`, `verify`, `jobs`, `kek destroy --version V`, `audit verify`,
//!   `audit list`, `audit compact --archive FILE`, `backup --out FILE`, `restore --in FILE`.
//! * `progressdb-kms check-config --config FILE`: [`progressdb_kms::check`].
//!
//! Exit status: 0 on success (including a clean shutdown on SIGTERM/SIGINT); 2 for a bad
//! configuration or provisioning (key or file at fault, no such token, PIN refused, KEK
//! missing or refused); 3 when an admin command cannot reach the admin socket; 1 for any
//! other failure. The reason is one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kms_api::admin::JobId;
use kms_api::KekVersion;
use progressdb_kms::backend::pkcs11::InitKekOutcome;
use progressdb_kms::{app, cli, Config};
use service_kit::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "progressdb-kms",
    version,
    about = "HSM-backed key management service for progressdb"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
enum StoreCommand {
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
enum AuditCommand {
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
enum KekCommand {
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

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("progressdb-kms: error: {e}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    if let Err(e) = service_kit::process::deny_core_dumps() {
        // Before logging starts: said here, and reported by /readyz (and status) while it runs.
        eprintln!("progressdb-kms: warning: cannot disable core dumps: {e}");
        service_kit::alerts::raise(
            service_kit::alerts::Alert::CoreDumpsNotDenied,
            "cannot disable core dumps",
        );
    }
    // Before any thread exists: the PIN leaves the environment for zeroizing memory.
    progressdb_kms::config::take_pin_from_env();
    let cli = Cli::parse();
    if let Command::CheckConfig { config, no_login } = &cli.command {
        // Its own report, also for a config that does not load.
        let login = if *no_login {
            progressdb_kms::check::Login::Skip
        } else {
            progressdb_kms::check::Login::Try
        };
        let report = progressdb_kms::check::run(config, login);
        print!("{}", report.render(config));
        return ExitCode::from(report.exit_code());
    }
    let path = match &cli.command {
        Command::CheckConfig { config, .. } => config,
        Command::Serve { config }
        | Command::InitKek { config }
        | Command::Status { config, .. }
        | Command::RotateKek { config, .. }
        | Command::Verify { config, .. }
        | Command::Jobs { config, .. }
        | Command::Kek {
            command: KekCommand::Destroy { config, .. },
        }
        | Command::Audit {
            command:
                AuditCommand::Verify { config, .. }
                | AuditCommand::List { config, .. }
                | AuditCommand::Compact { config, .. },
        }
        | Command::Backup { config, .. }
        | Command::Restore { config, .. }
        | Command::Compact { config }
        | Command::Store {
            command: StoreCommand::Copy { config, .. },
        }
        | Command::ImportCopies { config, .. } => config,
    };
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    telemetry::init(&cfg.log);
    match cli.command {
        Command::Serve { .. } => serve(&cfg),
        Command::CheckConfig { .. } => ExitCode::SUCCESS, // handled above
        Command::InitKek { .. } => match app::init_kek(&cfg) {
            Ok(InitKekOutcome::Created(k)) => {
                println!("created KEK {} version {}", k.id, k.version);
                ExitCode::SUCCESS
            }
            Ok(InitKekOutcome::AlreadyPresent(k)) => {
                println!(
                    "KEK {} version {} already present; nothing changed",
                    k.id, k.version
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(exit_code(&e), &e),
        },
        Command::Status { json, .. } => admin(cli::status(&cfg, output(json))),
        Command::RotateKek { no_wait, json, .. } => {
            admin(cli::rotate_kek(&cfg, wait(no_wait), output(json)))
        }
        Command::Verify { no_wait, json, .. } => {
            admin(cli::verify(&cfg, wait(no_wait), output(json)))
        }
        Command::Jobs { id, json, .. } => {
            let id = match id.map(|s| JobId::parse(&s)).transpose() {
                Ok(id) => id,
                Err(e) => return fail(2, &format!("--id: {e}")),
            };
            admin(cli::jobs(&cfg, id, output(json)))
        }
        Command::Kek {
            command: KekCommand::Destroy { version, .. },
        } => match KekVersion::new(version) {
            Ok(v) => admin(cli::destroy_kek(&cfg, v)),
            Err(e) => fail(2, &format!("--version: {e}")),
        },
        Command::Audit {
            command: AuditCommand::Verify { json, .. },
        } => admin(cli::audit_verify(&cfg, output(json))),
        Command::Audit {
            command: AuditCommand::List { after, limit, .. },
        } => admin(cli::audit_list(&cfg, after, limit)),
        Command::Audit {
            command: AuditCommand::Compact { archive, .. },
        } => admin(cli::audit_compact(&cfg, &archive)),
        Command::Backup { out, .. } => admin(cli::backup(&cfg, &out)),
        Command::ImportCopies { input, json, .. } => {
            admin(cli::import_copies(&cfg, &input, output(json)))
        }
        Command::Compact { .. } => {
            if !matches!(
                cfg.store.backend,
                progressdb_kms::config::StoreBackend::Lmdb { .. }
            ) {
                return fail(
                    2,
                    &"compact is for the LMDB store; PostgreSQL reclaims space with VACUUM (docs/operations.md)",
                );
            }
            match progressdb_kms::keystore::lmdb::LmdbStore::compact(&cfg.store.path) {
                Ok((before, after)) => {
                    println!("key store compacted: {before} -> {after} bytes");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, &e),
            }
        }
        Command::Store {
            command: StoreCommand::Copy { from, to, json, .. },
        } => store_copy(&cfg, &from, &to, json),
        Command::Restore {
            input,
            resurrect,
            audit,
            accept_unchecked_destroys,
            json,
            ..
        } => {
            let keys = match resurrect
                .iter()
                .map(|k| kms_api::KeyId::parse(k))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(k) => k,
                Err(e) => return fail(2, &format!("--resurrect: {e}")),
            };
            let check = match (audit, accept_unchecked_destroys) {
                (Some(f), _) => cli::RestoreCheck::Export(f),
                (None, true) => cli::RestoreCheck::Unchecked,
                (None, false) => cli::RestoreCheck::Store,
            };
            admin(cli::restore(&cfg, &input, &keys, check, output(json)))
        }
    }
}

/// `store copy`: exit 2 for what the operator must fix (a bad store name, a target that is
/// not empty), 1 for a copy that failed or does not verify.
fn store_copy(cfg: &Config, from: &str, to: &str, json: bool) -> ExitCode {
    use progressdb_kms::app::CopySide;
    use progressdb_kms::storecopy::{self, CopyError, StoreSpec};
    let (from, to) = match (from.parse::<StoreSpec>(), to.parse::<StoreSpec>()) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) => return fail(2, &format!("--from: {e}")),
        (_, Err(e)) => return fail(2, &format!("--to: {e}")),
    };
    if from == to {
        return fail(2, &"--from and --to name the same store");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async {
        let source = app::open_copy_side(cfg, &from, CopySide::Source)
            .await
            .map_err(|e| (1, e.to_string()))?;
        let target = app::open_copy_side(cfg, &to, CopySide::Target)
            .await
            .map_err(|e| (1, e.to_string()))?;
        storecopy::copy(&source, &target).await.map_err(|e| {
            let code = match e {
                CopyError::TargetNotEmpty(_) => 2,
                CopyError::Source(_) | CopyError::Mismatch(_) | CopyError::Store(_) => 1,
            };
            (code, e.to_string())
        })
    });
    match result {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "copied and verified: {} key records ({} active, {} destroyed), {} KEK versions, {} jobs, {} audit entries (head {}), {} pending audit entries",
                    r.key_records,
                    r.active,
                    r.destroyed,
                    r.kek_versions,
                    r.jobs,
                    r.audit_entries,
                    r.audit_head_seq.map_or_else(|| "none".to_owned(), |s| s.to_string()),
                    r.pending_audits
                );
            }
            ExitCode::SUCCESS
        }
        Err((code, e)) => fail(code, &e),
    }
}

fn output(json: bool) -> cli::Output {
    if json {
        cli::Output::Json
    } else {
        cli::Output::Text
    }
}

fn wait(no_wait: bool) -> cli::Wait {
    if no_wait {
        cli::Wait::No
    } else {
        cli::Wait::UntilDone
    }
}

/// Runs an admin command on a small runtime of its own.
fn admin(f: impl std::future::Future<Output = Result<(), cli::CliError>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the async runtime: {e}")),
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.exit_code(), &e),
    }
}

/// 2 for what the operator must fix in the configuration or the token's provisioning (a bad
/// key or file, no such token, a refused PIN, a missing or refused KEK); 1 for everything
/// else (device errors, I/O, the key store, the socket).
fn exit_code(e: &app::StartError) -> u8 {
    use progressdb_kms::backend::BackendError as B;
    match e {
        app::StartError::Config(_)
        | app::StartError::Backend(
            B::Config(_)
            | B::PinRejected(_)
            | B::KekRefused { .. }
            | B::KekNotFound { .. }
            | B::HmacKey { .. },
        )
        | app::StartError::KekPin(progressdb_kms::kek_pin::PinError::Unknown { .. }) => 2,
        app::StartError::Backend(
            B::Unavailable(_) | B::InvalidWrapped | B::Overloaded | B::Internal(_),
        )
        | app::StartError::Store(_)
        | app::StartError::KekPin(progressdb_kms::kek_pin::PinError::Store(_))
        | app::StartError::Transport(_)
        | app::StartError::Task(_) => 1,
    }
}

fn serve(cfg: &Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kms-rt")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the async runtime: {e}")),
    };
    let result = rt.block_on(async {
        // Install the handlers first, so a signal during start-up is not fatal: it is seen by
        // the accept loop, which then stops at once.
        let shutdown = service_kit::shutdown::signals()
            .map_err(|e| app::StartError::Task(format!("cannot install signal handlers: {e}")))?;
        service_kit::shutdown::survive_file_size_limit()
            .map_err(|e| app::StartError::Task(format!("cannot install signal handlers: {e}")))?;
        app::serve(cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code(&e), &e),
    }
}
