//! `progressdb-kms`: prepare the process, parse the command line, run the command
//! ([`progressdb_kms::tools::command`] says what each does and its exit status).

use std::process::ExitCode;

use clap::Parser as _;
use progressdb_kms::tools::command::{self, Cli};

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
    command::run(Cli::parse())
}
