//! `sundial`: the node and its command-line client. With no subcommand (or `server`) it runs
//! a node: data in ./sundial-data, HTTP on 127.0.0.1:8080, the binary protocol on
//! 127.0.0.1:7070 — each a setting (docs/CONFIGURATION.md: flags, SUNDIAL_* variables, an
//! optional TOML file). `job`, `dlq` and `status` talk to a running node; `certs` makes a
//! cluster's CA and node certificates.

use clap::Parser;
use std::process::ExitCode;
use sundial_node::config::{ServerOptions, Settings};
use sundial_node::server::{Node, RUNTIME_KIND};

mod cli;

/// mimalloc, not the system allocator: a node allocates and frees small objects on every
/// create and fire from two shard threads, where glibc's malloc spent a quarter of the
/// node's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use cli::{CertsCommand, Connection, DlqCommand, FlowCommand, JobCommand};

#[derive(clap::Parser, Debug)]
#[command(
    name = "sundial",
    version,
    about = "Sundial: a durable scheduler for HTTP callbacks",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    server: ServerOptions,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run a node (the default when no subcommand is given).
    Server(Box<ServerOptions>),
    /// Jobs on a node: create, upsert, show, list, cancel, pause, resume, trigger, backfill,
    /// redrive, bulk verbs, schedule preview.
    Job {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: JobCommand,
    },
    /// The dead-letter queue: list, redrive, purge.
    Dlq {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Flow-control keys: list, show, pause, resume.
    Flow {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: FlowCommand,
    },
    /// A node's health: role, partitions, job counts, dispatch, memory.
    Status {
        #[command(flatten)]
        connection: Connection,
    },
    /// The cluster: members, partitions, leaders, indexes and replication lag.
    Cluster {
        #[command(flatten)]
        connection: Connection,
        #[command(subcommand)]
        command: cli::ClusterCommand,
    },
    /// Start a local cluster on loopback (generated certificates, data under one folder).
    DevCluster(cli::DevClusterArgs),
    /// The cluster's CA and node certificates (mutual TLS between nodes).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

/// mimalloc's `arena_eager_commit` option (its index in `mi_option_e`, mimalloc.h).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Arena memory is committed as it is used, not when the arena is reserved: eagerly
/// committed arenas made pages resident around the job table's reserved (and unused) room
/// (docs/BENCHMARKS.md, "tables that do not regrow"). The variables that name the option
/// (`MIMALLOC_ARENA_EAGER_COMMIT`, or its old name `MIMALLOC_EAGER_REGION_COMMIT`), when set,
/// still decide. (`mi_option_set_default` would not do: mimalloc has read its options, and
/// so fixed their defaults, before `main` runs.)
fn commit_allocator_memory_as_used() {
    let named = ["MIMALLOC_ARENA_EAGER_COMMIT", "MIMALLOC_EAGER_REGION_COMMIT"];
    if named.iter().all(|name| std::env::var_os(name).is_none()) {
        // SAFETY: mimalloc's options are plain words written without synchronisation; this
        // runs first in `main`, before the process starts any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
}

fn main() -> ExitCode {
    commit_allocator_memory_as_used();
    let cli = Cli::parse();
    let options = match cli.command {
        None => cli.server,
        Some(Command::Server(options)) => *options,
        Some(Command::Job { connection, command }) => return cli::job(&connection, &command),
        Some(Command::Dlq { connection, command }) => return cli::dlq(&connection, &command),
        Some(Command::Flow { connection, command }) => return cli::flow(&connection, &command),
        Some(Command::Status { connection }) => return cli::status(&connection),
        Some(Command::Certs { command }) => return cli::certs(&command),
        Some(Command::DevCluster(args)) => return cli::dev_cluster(&args),
        Some(Command::Cluster { connection, command }) => return cli::cluster(&connection, &command),
    };
    let settings = match options.with_file().and_then(|options| options.resolve()) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("sundial: {message}");
            return ExitCode::from(2);
        }
    };
    // Colours only on a terminal: a file or a pipe gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(colour).with_max_level(settings.log_level);
    if settings.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    // The main thread accepts connections and watches signals; shards do the work.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sundial: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sundial: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a node until a signal or a shard's end, saying where it listens.
async fn serve(settings: Settings) -> Result<(), String> {
    let data = settings.data.clone();
    let node = Node::start(settings).await?;
    let (address, binary_address) = (node.http, node.binary);
    say(&format!("sundial listening on http://{address} and sundial://{binary_address} (data in {})", data.display()));
    say(&format!(
        "create a job:  curl -X POST http://{address}/jobs -H 'content-type: application/json' \\\n  -d '{{\"delay\": \"10s\", \"url\": \"https://example.com/hook\", \"json\": {{\"hello\": \"world\"}}}}'"
    ));
    tracing::info!(
        %address,
        %binary_address,
        data = %data.display(),
        jobs = node.jobs_at_start,
        partitions = node.facts().meta.partitions,
        shards = node.facts().shards,
        runtime = RUNTIME_KIND,
        log_backend = node.facts().log_backend,
        "sundial started"
    );
    if node.tokens_required > 0 {
        say(&format!("bearer tokens required ({} configured)", node.tokens_required));
    }
    node.run().await?;
    tracing::info!("sundial stopped");
    say("sundial stopped");
    Ok(())
}

/// A line on stdout; a closed stdout (the reader went away) must not stop the node.
fn say(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}
