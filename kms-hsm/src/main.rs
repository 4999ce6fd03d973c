//! `progressdb-kms`: parse the command line, load the config, start logging, run.
//!
//! * `progressdb-kms serve --config FILE`
//! * `progressdb-kms init-kek --config FILE`
//!
//! Exit status: 0 on success (including a clean shutdown on SIGTERM/SIGINT); 2 for a bad
//! configuration or provisioning (key or file at fault, no such token, PIN refused, KEK
//! missing or refused); 1 for any other failure. The reason is one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use progressdb_kms::backend::pkcs11::InitKekOutcome;
use progressdb_kms::{app, Config};
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
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("progressdb-kms: error: {e}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match &cli.command {
        Command::Serve { config } | Command::InitKek { config } => config,
    };
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    telemetry::init(&cfg.log);
    match cli.command {
        Command::Serve { .. } => serve(&cfg),
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
            B::Config(_) | B::PinRejected(_) | B::KekRefused { .. } | B::KekNotFound { .. },
        ) => 2,
        app::StartError::Backend(
            B::Unavailable(_) | B::InvalidWrapped | B::Overloaded | B::Internal(_),
        )
        | app::StartError::Store(_)
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
        app::serve(cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(exit_code(&e), &e),
    }
}
