//! The scenarios `sundial-loadgen` runs, each answering Ok(pass) or Err(could not run).

pub mod fire;
pub mod ingest;
pub mod mixed;
pub mod overload;
pub mod references;

use crate::cli::Scenario;

/// Runs the scenario the command line chose.
pub async fn run(scenario: Scenario) -> Result<bool, String> {
    match scenario {
        Scenario::Ingest { load, due_in_s } => ingest::ingest(load, due_in_s).await,
        Scenario::Fire { load, fire: args } => fire::fire(load, args, None).await,
        Scenario::Soak { load, fire: args, pid, sample_s } => fire::fire(load, args, Some((pid, sample_s))).await,
        Scenario::Mixed { load, mix, due_in_s } => mixed::mixed(load, &mix, due_in_s).await,
        Scenario::Overload { load, factor, capacity, measure_seconds, due_in_s } => {
            overload::overload(load, overload::OverloadArgs { factor, capacity, measure_seconds, due_in_s }).await
        }
        Scenario::Reference { what } => references::run(what).await,
    }
}

/// A prefix for this run's job ids, unique per run: two runs started in the same
/// millisecond (a fill beside a soak) differ by their process ids.
pub fn run_name() -> String {
    format!("lg{:x}-{:x}", crate::receiver::now_ms(), std::process::id())
}
