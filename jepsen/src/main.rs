//! `sundial-jepsen`: runs fault injection against a local cluster and exits 0 when every
//! property of the contract held, 1 when one failed, 2 when the run could not be made.

use clap::Parser;
use std::process::ExitCode;
use sundial_jepsen::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sundial-jepsen: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match cli.command {
        Command::Run(args) => runtime.block_on(async {
            let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(e) => return Err(format!("cannot watch SIGTERM: {e}")),
            };
            tokio::select! {
                outcome = sundial_jepsen::run::run(*args) => outcome,
                // Dropping the run stops its nodes and removes its partition rules.
                _ = tokio::signal::ctrl_c() => Err("interrupted; nodes stopped and partition rules removed".to_string()),
                _ = terminate.recv() => Err("terminated; nodes stopped and partition rules removed".to_string()),
            }
        }),
        Command::Check { dir } => sundial_jepsen::run::check_stored(&dir),
        Command::Clean => sundial_jepsen::firewall::clean().map(|tables| {
            println!("removed {} table(s) {}", tables.len(), tables.join(" "));
            true
        }),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("sundial-jepsen: {message}");
            ExitCode::from(2)
        }
    }
}
