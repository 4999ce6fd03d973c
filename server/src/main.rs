//! `progressdb serve --config FILE`: parse the config, initialise tracing, build the server,
//! serve until SIGTERM/SIGINT. Also `check-config` ([`progressdb::check`]), the offline
//! `compact` and `restore`, `backup` and `verify` (of the running server) and `backup-check`
//! ([`progressdb::backup`]). Configuration errors exit with status 2 and one line on
//! stderr naming the key or file at fault.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use progressdb::{Config, Server};

#[derive(Debug, Parser)]
#[command(
    name = "progressdb",
    version,
    about = "progressdb: an encrypted thread and message store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy the whole store into a new, empty one (LMDB to PostgreSQL or back), then read
    /// both again and compare them. Both stores are opened exclusively: refused while a
    /// server uses either. Exit 2: a bad store name or a target that is not empty (nothing
    /// written); exit 1: the copy failed or does not match.
    Copy {
        /// TOML configuration file: its [store] gives the map sizes (LMDB) or the
        /// password file, CA file and timeout (PostgreSQL).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The source: lmdb:PATH or postgres:URL (a libpq connection string).
        #[arg(long, value_name = "STORE")]
        from: String,
        /// The target, empty: lmdb:PATH or postgres:URL.
        #[arg(long, value_name = "STORE")]
        to: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve {
        /// TOML configuration file; keys can be overridden with PROGRESSDB__SECTION__KEY.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config and the files it names without starting: every key, the listen
    /// address, the store directory, the API keys file (mode, content), the KMS endpoint
    /// (TLS files, socket, whether a KMS answers). One line per finding; exit 2 when there is
    /// a problem.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// OFFLINE (stop the server first; refused while it runs): rewrite the store without its
    /// free pages, where the bytes of replaced and deleted records linger (e.g. plain
    /// messages after an in-place encryption, ciphertext of deleted threads).
    Compact {
        /// TOML configuration file (its store.path is compacted).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// OFFLINE store tools (stop the server first).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// ONLINE: a backup of the running server (asked for over its API with the first admin
    /// key of the keys file): a consistent, compacted copy of the store and a manifest,
    /// written to a new file atomically and checked whole. Prints the manifest's counts.
    Backup {
        /// The server's TOML configuration file (http.listen, auth.keys_file).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The backup file to write (must not exist).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// OFFLINE (stop the server first; refused while it runs): restore a backup into the
    /// store of the config. The file is checked whole first; an empty store only, unless
    /// --force.
    Restore {
        /// TOML configuration file (its store.path is restored into).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The backup file.
        #[arg(long = "in", value_name = "PATH")]
        input: PathBuf,
        /// Replace a store that holds threads or messages.
        #[arg(long)]
        force: bool,
    },
    /// ONLINE: check every thread of the running server: its keys still known to the KMS and
    /// every message (or every --sample-th) opening. A progress bar on a terminal; JSON
    /// counts on stdout at the end; exit 1 when any thread has a problem.
    Verify {
        /// The server's TOML configuration file (http.listen, auth.keys_file).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Open every N-th message only (1: every message).
        #[arg(long, value_name = "N", default_value_t = 1)]
        sample: u64,
        /// Start after this thread (the cursor an interrupted run names).
        #[arg(long, value_name = "THREAD")]
        after: Option<String>,
    },
    /// Which threads a server backup and a KMS backup, restored together, would leave
    /// unreadable (keys missing from the KMS backup, destroyed, or under a destroyed KEK
    /// version). JSON on stdout; exit 1 when any thread would be unreadable.
    BackupCheck {
        /// A server backup (`progressdb backup`).
        #[arg(long, value_name = "PATH")]
        backup: PathBuf,
        /// A KMS backup (`progressdb-kms backup`).
        #[arg(long, value_name = "PATH")]
        kms_backup: PathBuf,
    },
}

fn main() -> ExitCode {
    if let Err(e) = service_kit::process::deny_core_dumps() {
        // Before logging starts: said here, and reported by /readyz (and status) while it runs.
        eprintln!("progressdb: warning: cannot disable core dumps: {e}");
        service_kit::alerts::raise(
            service_kit::alerts::Alert::CoreDumpsNotDenied,
            "cannot disable core dumps",
        );
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => {
            let report = progressdb::check::run(&config);
            print!("{}", report.render(&config));
            ExitCode::from(report.exit_code())
        }
        Command::Backup { config, out } => with_config(&config, |cfg| {
            runtime()?.block_on(progressdb::backup::cli::backup(cfg, &out))
        })
        .map_or_else(
            |e| fail(e, 1),
            |m| {
                println!(
                    "backup written to {}: {} threads, {} messages, {} bytes (sha256 {})",
                    out.display(),
                    m.summary.threads,
                    m.summary.messages,
                    m.data_bytes,
                    m.data_sha256
                );
                ExitCode::SUCCESS
            },
        ),
        Command::Restore {
            config,
            input,
            force,
        } => with_config(&config, |cfg| {
            let existing = if force {
                progressdb::backup::Existing::Replace
            } else {
                progressdb::backup::Existing::Refuse
            };
            runtime()?
                .block_on(progressdb::backup::restore(
                    &cfg.store.path,
                    &input,
                    existing,
                ))
                .map_err(|e| e.to_string())
        })
        .map_or_else(
            |e| fail(e, 1),
            |m| {
                println!(
                    "restored into the store of {}: {} threads, {} messages",
                    config.display(),
                    m.summary.threads,
                    m.summary.messages
                );
                ExitCode::SUCCESS
            },
        ),
        Command::Verify {
            config,
            sample,
            after,
        } => match with_config(&config, |cfg| {
            runtime()?.block_on(progressdb::backup::cli::verify(cfg, sample, after))
        }) {
            Err(e) => fail(e, 2),
            Ok(t) => {
                println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default());
                if t.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
        },
        Command::BackupCheck { backup, kms_backup } => {
            match progressdb::backup::cli::check_pair(&backup, &kms_backup) {
                Err(e) => fail(e, 2),
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                    if report.unreadable.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
            }
        }
        Command::Store {
            command:
                StoreCommand::Copy {
                    config,
                    from,
                    to,
                    json,
                },
        } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(e, 2),
            };
            service_kit::telemetry::init(&cfg.log);
            store_copy(&cfg, &from, &to, json)
        }
        Command::Compact { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(e, 2),
            };
            service_kit::telemetry::init(&cfg.log);
            if cfg.store.backend == progressdb::config::StoreBackendKind::Postgres {
                return fail(
                    "compact is for LMDB stores; PostgreSQL reclaims space with VACUUM",
                    2,
                );
            }
            match progressdb::store::compact(&cfg.store.path) {
                Ok((before, after)) => {
                    println!("store compacted: {before} -> {after} bytes");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("store.path {}: {e}", cfg.store.path.display()), 1),
            }
        }
    }
}

/// `store copy`: exit 2 for what the operator must fix (a bad store name, a target that is
/// not empty), 1 for a copy that failed or does not verify.
fn store_copy(cfg: &Config, from: &str, to: &str, json: bool) -> ExitCode {
    use progressdb::store_copy::{self, CopyError, Side};
    let (from, to) = match service_kit::store_spec::copy_pair(from, to) {
        Ok(pair) => pair,
        Err(e) => return fail(e, 2),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(e, 1),
    };
    let result = rt.block_on(async {
        let source = store_copy::open_side(cfg, &from, Side::Source).await?;
        let target = store_copy::open_side(cfg, &to, Side::Target).await?;
        let r = store_copy::copy(&source, &target).await;
        // Closing joins the stores' writer threads: not on the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || drop((source, target))).await;
        r
    });
    match result {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                    "copied and verified: {} threads, {} messages ({} pairs, {} bytes, sha256 {})",
                    r.threads, r.messages, r.pairs, r.bytes, r.sha256
                );
            }
            ExitCode::SUCCESS
        }
        Err(e @ CopyError::TargetNotEmpty) => fail(e, 2),
        Err(e @ (CopyError::Open(_) | CopyError::Mismatch(_) | CopyError::Store(_))) => fail(e, 1),
    }
}

/// Loads the config at `path` (logging as it says) and runs `f` with it; a config error is
/// reported as `f`'s.
fn with_config<T>(path: &Path, f: impl FnOnce(&Config) -> Result<T, String>) -> Result<T, String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    service_kit::telemetry::init(&cfg.log);
    f(&cfg)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("progressdb: {msg}");
    ExitCode::from(code)
}

fn serve(path: &Path) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    service_kit::telemetry::init(&cfg.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}"), 1),
    };
    rt.block_on(async {
        // Signal handlers first, so a SIGTERM during start-up is a clean stop too.
        let shutdown = match service_kit::shutdown::signals() {
            Ok(s) => s,
            Err(e) => return fail(format!("cannot install signal handlers: {e}"), 1),
        };
        if let Err(e) = service_kit::shutdown::survive_file_size_limit() {
            return fail(format!("cannot install signal handlers: {e}"), 1);
        }
        let server = match Server::build(&cfg).await {
            Ok(s) => s,
            Err(e) => return fail(e, 2),
        };
        let listener = match tokio::net::TcpListener::bind(cfg.http.listen).await {
            Ok(l) => l,
            Err(e) => return fail(format!("http.listen {}: {e}", cfg.http.listen), 2),
        };
        match server.run(listener, shutdown).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("server error: {e}"), 1),
        }
    })
}
