//! `sundial-loadgen`: runs a scenario against a node or a cluster (binary protocol or
//! HTTP), shows a live progress line, prints percentile tables and a verdict, writes JSON
//! results and SVG plots, and exits 1 when the run broke the contract (a job lost, early,
//! repeated with another key, badly signed) — 2 when it could not run at all.

use clap::Parser;
use std::process::ExitCode;
use sundial_loadgen::cli::Cli;
use sundial_loadgen::scenario;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sundial-loadgen: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(scenario::run(cli.scenario));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("sundial-loadgen: {message}");
            ExitCode::from(2)
        }
    }
}
