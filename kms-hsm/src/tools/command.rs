//! The `progressdb-kms` command line: every subcommand's arguments ([`Cli`], clap, in
//! `args.rs`) and what each one runs ([`run`]). The binary's `main` only prepares the process
//! and parses.
//!
//! * `progressdb-kms serve --config FILE`
//! * `progressdb-kms init-kek --config FILE`
//! * admin subcommands, clients of the running KMS's admin socket ([`crate::cli`]):
//!   `status`, `rotate-kek`, `verify`, `jobs`, `kek destroy --version V`, `audit verify`,
//!   `audit list`, `audit compact --archive FILE`, `backup --out FILE`, `restore --in FILE`.
//! * `progressdb-kms check-config --config FILE`: [`crate::check`].
//! * `progressdb-kms store copy`: [`crate::storecopy`].
//!
//! Exit status: 0 on success (including a clean shutdown on SIGTERM/SIGINT); 2 for a bad
//! configuration or provisioning (key or file at fault, no such token, PIN refused, KEK
//! missing or refused); 3 when an admin command cannot reach the admin socket; 1 for any
//! other failure. The reason is one line on stderr.

mod args;
pub use args::*;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::backend::pkcs11::InitKekOutcome;
use crate::{app, cli, Config};
use clap::{Parser, Subcommand};
use kms_api::admin::JobId;
use kms_api::KekVersion;
use service_kit::telemetry;

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("progressdb-kms: error: {e}");
    ExitCode::from(code)
}

/// Runs the command `cli` names; the exit status and a one-line reason on failure are as
/// `progressdb-kms --help` and docs/operations.md say.
pub fn run(cli: Cli) -> ExitCode {
    if let Command::CheckConfig { config, no_login } = &cli.command {
        // Its own report, also for a config that does not load.
        let login = if *no_login {
            crate::check::Login::Skip
        } else {
            crate::check::Login::Try
        };
        let report = crate::check::run(config, login);
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
            if !matches!(cfg.store.backend, crate::config::StoreBackend::Lmdb { .. }) {
                return fail(
                    2,
                    &"compact is for the LMDB store; PostgreSQL reclaims space with VACUUM (docs/operations.md)",
                );
            }
            match crate::keystore::lmdb::LmdbStore::compact(&cfg.store.path) {
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
    use crate::app::CopySide;
    use crate::storecopy::{self, CopyError};
    let (from, to) = match service_kit::store_spec::copy_pair(from, to) {
        Ok(pair) => pair,
        Err(e) => return fail(2, &e),
    };
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
    use crate::backend::BackendError as B;
    match e {
        app::StartError::Config(_)
        | app::StartError::Backend(
            B::Config(_)
            | B::PinRejected(_)
            | B::KekRefused { .. }
            | B::KekNotFound { .. }
            | B::HmacKey { .. },
        )
        | app::StartError::KekPin(crate::kek_pin::PinError::Unknown { .. }) => 2,
        app::StartError::Backend(
            B::Unavailable(_) | B::InvalidWrapped | B::Overloaded | B::Internal(_),
        )
        | app::StartError::Store(_)
        | app::StartError::KekPin(crate::kek_pin::PinError::Store(_))
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
