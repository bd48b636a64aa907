//! The `sundial` client subcommands (job, dlq, status): they call a node's HTTP API and
//! print what it answered — for people by default, the API's JSON with `--json`. Errors go
//! to stderr with the API's message and field, and the exit status is 1. `certs` makes the
//! cluster's CA and node certificates.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use sundial_node::api::ui::time_text;

#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// The node's HTTP address.
    #[arg(long, env = "SUNDIAL_NODE", default_value = "http://127.0.0.1:8080", global = true)]
    pub node: String,
    /// Bearer token, when the node requires one.
    #[arg(long, env = "SUNDIAL_TOKEN", global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of text (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum JobCommand {
    /// Create a job: give --url and one of --delay, --at or --cron, or a whole --request.
    Create(Box<CreateArgs>),
    /// Show a job.
    Get { id: String },
    /// Cancel a job (its pending fires never happen).
    Cancel { id: String },
    /// List jobs, oldest first.
    List {
        /// Only jobs with this status (pending, in_progress, completed, failed, cancelled, timeout).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show a job's attempts.
    Executions { id: String },
    /// Create the job with --id, or replace its schedule and target (PUT /jobs/{id}).
    Upsert(Box<CreateArgs>),
    /// Pause a job: no fire starts until it is resumed.
    Pause { id: String },
    /// Resume a paused job (missed fires follow its misfire policy).
    Resume { id: String },
    /// An extra fire now, with its own key; the schedule goes on.
    Trigger { id: String },
    /// A fire for each occurrence of a cron job's schedule in a past range (at most 1000).
    Backfill {
        id: String,
        /// Start of the range (RFC 3339, or Unix milliseconds), inclusive.
        #[arg(long)]
        from: String,
        /// End of the range, inclusive; not in the future.
        #[arg(long)]
        to: String,
    },
    /// Put every dead-lettered fire of a job back to run again.
    Redrive { id: String },
    /// Cancel, redrive, purge, pause, resume or delete many jobs: by --ids or by --label.
    Bulk {
        /// cancel, redrive, purge (dead letters), pause, resume or delete.
        action: String,
        /// Job ids, comma-separated (at most 1000).
        #[arg(long, value_delimiter = ',', conflicts_with = "label")]
        ids: Vec<String>,
        /// KEY=VALUE a job must carry (repeat for several; all must match).
        #[arg(long)]
        label: Vec<String>,
        /// Jobs matched by label at most (1..=1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The next fires a job request would have, without creating it.
    Preview {
        #[command(flatten)]
        job: Box<CreateArgs>,
        /// Fires to show (1..=100).
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// As if created at this time (RFC 3339, or Unix milliseconds); default now.
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum FlowCommand {
    /// Every flow key: limits, pause, jobs, attempts in flight, backlog.
    List,
    /// One flow key.
    Get {
        key: String,
    },
    /// Hold every fire of the key's jobs until it is resumed.
    Pause {
        key: String,
    },
    Resume {
        key: String,
    },
}

#[derive(clap::Args, Clone, Debug)]
pub struct CreateArgs {
    /// The webhook URL.
    #[arg(long)]
    pub url: Option<String>,
    /// Fire once after this long (e.g. 30s, 5m, 2h).
    #[arg(long)]
    pub delay: Option<String>,
    /// Fire once at this time (RFC 3339, or Unix milliseconds).
    #[arg(long)]
    pub at: Option<String>,
    /// Fire on this cron schedule (5 or 6 fields).
    #[arg(long)]
    pub cron: Option<String>,
    /// The cron schedule's time zone (IANA name).
    #[arg(long)]
    pub time_zone: Option<String>,
    /// JSON body to send.
    #[arg(long = "body-json")]
    pub body_json: Option<String>,
    /// HTTP method (default POST).
    #[arg(long)]
    pub method: Option<String>,
    /// The job's id (default: one is generated).
    #[arg(long)]
    pub id: Option<String>,
    /// A label KEY=VALUE (repeat for several).
    #[arg(long)]
    pub label: Vec<String>,
    /// Retries: attempts per fire, the first included.
    #[arg(long)]
    pub max_attempts: Option<u64>,
    /// Pause before each retry: exponential (default), fixed, or a list of ms such as 1000,5000,30000.
    #[arg(long)]
    pub backoff: Option<String>,
    /// The first retry's pause (exponential), or every retry's (fixed), ms.
    #[arg(long)]
    pub initial_backoff_ms: Option<u64>,
    /// POST each delivered fire's outcome here.
    #[arg(long)]
    pub on_success: Option<String>,
    /// POST each dead-lettered fire's outcome here.
    #[arg(long)]
    pub on_failure: Option<String>,
    /// The flow-control key whose limits the job's fires share.
    #[arg(long)]
    pub flow_key: Option<String>,
    /// The key's attempts in flight at once.
    #[arg(long, requires = "flow_key")]
    pub parallelism: Option<u64>,
    /// The key's attempts started per --period (default per second).
    #[arg(long, requires = "flow_key")]
    pub rate: Option<u64>,
    #[arg(long, requires = "rate")]
    pub period: Option<String>,
    /// The key's fires go one at a time, in due-time order.
    #[arg(long, requires = "flow_key")]
    pub ordered: bool,
    /// A cron job pauses itself after this many failed fires in a row.
    #[arg(long)]
    pub pause_after_failures: Option<u64>,
    /// A wall time repeated by a DST change fires: first (default) or both.
    #[arg(long)]
    pub dst_repeated: Option<String>,
    /// A wall time skipped by a DST change: shift (fire after the gap, default) or skip.
    #[arg(long)]
    pub dst_missing: Option<String>,
    /// Signs the job's webhooks instead of the node's secret.
    #[arg(long)]
    pub secret: Option<String>,
    /// The secret replacing --secret: both sign during the rotation.
    #[arg(long, requires = "secret")]
    pub secret_next: Option<String>,
    /// A whole job request document (JSON, as POST /jobs takes); `-` reads it from stdin.
    #[arg(long, conflicts_with_all = ["url", "delay", "at", "cron", "time_zone", "body_json", "method", "label",
        "max_attempts", "backoff", "initial_backoff_ms", "on_success", "on_failure", "flow_key", "pause_after_failures", "dst_repeated",
        "dst_missing", "secret"])]
    pub request: Option<String>,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum DlqCommand {
    /// List dead-lettered fires, oldest first.
    List,
    /// Put a dead-lettered fire back to run again.
    Redrive { id: String, fire_ms: u64 },
    /// Drop dead letters: one job's, or every one with --all.
    Purge {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

/// An answer from the node: status and JSON body (Null when empty).
struct Reply {
    status: u16,
    body: Value,
}

fn call(connection: &Connection, method: &str, path: &str, body: Option<&Value>) -> Result<Reply, String> {
    let authority = connection
        .node
        .strip_prefix("http://")
        .ok_or_else(|| format!("--node: must start with http://, not {:?}", connection.node))?
        .trim_end_matches('/');
    let address: SocketAddr = authority
        .to_socket_addrs()
        .map_err(|e| format!("--node: {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("--node: {authority} has no address"))?;
    let unreachable = |e: std::io::Error| format!("cannot reach {}: {e}", connection.node);
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(unreachable)?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(unreachable)?;
    let payload = body.map(Value::to_string).unwrap_or_default();
    let authorization = connection.token.as_ref().map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{authorization}connection: close\r\n\r\n",
        payload.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(payload.as_bytes())).map_err(unreachable)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or("the node's answer is not HTTP")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(Reply { status, body: serde_json::from_str(body).unwrap_or(Value::Null) })
}

/// Prints the reply with `human` (or as JSON), or the error; the exit status says which.
fn finish(connection: &Connection, result: Result<Reply, String>, human: impl FnOnce(&Value) -> String) -> ExitCode {
    match result {
        Ok(reply) if reply.status < 400 => {
            if connection.json {
                println!("{}", serde_json::to_string_pretty(&reply.body).unwrap_or_default());
            } else {
                print!("{}", human(&reply.body));
            }
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            if connection.json {
                println!("{}", serde_json::to_string_pretty(&reply.body).unwrap_or_default());
            }
            let message = reply.body["error"].as_str().unwrap_or("(no message)");
            let code = reply.body["code"].as_str().unwrap_or("error");
            eprintln!("sundial: {} {code}: {message}", reply.status);
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("sundial: {message}");
            ExitCode::FAILURE
        }
    }
}

pub fn job(connection: &Connection, command: &JobCommand) -> ExitCode {
    match command {
        JobCommand::Create(args) => {
            let request = match create_request(args) {
                Ok(request) => request,
                Err(message) => {
                    eprintln!("sundial: {message}");
                    return ExitCode::from(2);
                }
            };
            finish(connection, call(connection, "POST", "/jobs", Some(&request)), |job| {
                format!("created {}\n{}", job["id"].as_str().unwrap_or("?"), job_text(job))
            })
        }
        JobCommand::Get { id } => finish(connection, call(connection, "GET", &format!("/jobs/{id}"), None), job_text),
        JobCommand::Cancel { id } => {
            finish(connection, call(connection, "POST", &format!("/jobs/{id}/cancel"), None), |job| {
                format!("cancelled {}\n", job["id"].as_str().unwrap_or(id))
            })
        }
        JobCommand::List { status, limit } => {
            let mut path = format!("/jobs?limit={limit}");
            if let Some(status) = status {
                path.push_str(&format!("&status={status}"));
            }
            finish(connection, call(connection, "GET", &path, None), |body| {
                let mut text = format!("{:<38} {:<12} {:<26} URL\n", "ID", "STATUS", "NEXT FIRE");
                for job in body["jobs"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "{:<38} {:<12} {:<26} {}\n",
                        job["id"].as_str().unwrap_or("?"),
                        job["status"].as_str().unwrap_or("?"),
                        time_text(&job["next_fire_ms"]),
                        job["webhook_url"].as_str().unwrap_or("")
                    ));
                }
                text
            })
        }
        JobCommand::Executions { id } => {
            finish(connection, call(connection, "GET", &format!("/jobs/{id}/executions"), None), |body| {
                let mut text =
                    format!("{:<26} {:>7} {:>6} {:>8}  ERROR / NOTE\n", "FIRE", "ATTEMPT", "STATUS", "LATENCY");
                for e in body["executions"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "{:<26} {:>7} {:>6} {:>6}ms  {}{}\n",
                        time_text(&e["fire_ms"]),
                        e["attempt"],
                        e["status_code"].as_u64().map_or("-".to_string(), |s| s.to_string()),
                        e["latency_ms"],
                        e["error"].as_str().unwrap_or(""),
                        e["note"].as_str().unwrap_or("")
                    ));
                }
                text
            })
        }
        JobCommand::Upsert(args) => {
            let request = match create_request(args) {
                Ok(request) => request,
                Err(message) => return usage(&message),
            };
            let Some(id) = request["id"].as_str().map(String::from) else {
                return usage("give the job's --id (or an id in --request)");
            };
            finish(connection, call(connection, "PUT", &format!("/jobs/{id}"), Some(&request)), |job| {
                format!("upserted {}\n{}", job["id"].as_str().unwrap_or("?"), job_text(job))
            })
        }
        JobCommand::Pause { id } => job_verb(connection, id, "pause", "paused"),
        JobCommand::Resume { id } => job_verb(connection, id, "resume", "resumed"),
        JobCommand::Redrive { id } => job_verb(connection, id, "redrive", "redriven"),
        JobCommand::Trigger { id } => job_verb(connection, id, "trigger", "triggered"),
        JobCommand::Backfill { id, from, to } => {
            let time = |t: &String| t.parse::<u64>().map_or_else(|_| json!(t), |ms| json!(ms));
            let body = json!({"from": time(from), "to": time(to)});
            finish(connection, call(connection, "POST", &format!("/jobs/{id}/backfill"), Some(&body)), |job| {
                let fires = job["fires_added"].as_array().cloned().unwrap_or_default();
                let times: Vec<String> = fires.iter().map(time_text).collect();
                format!(
                    "backfilled {id}: {} fires\n{}",
                    fires.len(),
                    times.iter().map(|t| format!("  {t}\n")).collect::<String>()
                )
            })
        }
        JobCommand::Bulk { action, ids, label, limit } => {
            let mut body = json!({"action": action});
            if !ids.is_empty() {
                body["ids"] = json!(ids);
            } else {
                match labels(label) {
                    Ok(labels) if !labels.is_empty() => body["labels"] = json!(labels),
                    Ok(_) => return usage("give --ids or at least one --label KEY=VALUE"),
                    Err(message) => return usage(&message),
                }
            }
            if let Some(limit) = limit {
                body["limit"] = json!(limit);
            }
            finish(connection, call(connection, "POST", "/jobs/bulk", Some(&body)), |report| {
                let mut text = format!(
                    "{action}: {} matched, {} done, {} failed{}\n",
                    report["matched"],
                    report["done"].as_array().map_or(0, Vec::len),
                    report["failed"].as_array().map_or(0, Vec::len),
                    if report["more"] == true { " (more match: run it again)" } else { "" }
                );
                for failed in report["failed"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "  {} {}: {}\n",
                        failed["id"].as_str().unwrap_or("?"),
                        failed["status"],
                        failed["error"].as_str().unwrap_or("")
                    ));
                }
                text
            })
        }
        JobCommand::Preview { job, count, from } => {
            let request = match create_request(job) {
                Ok(request) => request,
                Err(message) => return usage(&message),
            };
            let mut path = format!("/jobs/preview?count={count}");
            if let Some(from) = from {
                path.push_str(&format!("&from={from}"));
            }
            finish(connection, call(connection, "POST", &path, Some(&request)), |preview| {
                preview["fires"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| format!("{}\n", t.as_str().unwrap_or("?")))
                    .collect()
            })
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("sundial: {message}");
    ExitCode::from(2)
}

/// `POST /jobs/{id}/{verb}`, printed as "<done> <id>".
fn job_verb(connection: &Connection, id: &str, verb: &str, done: &str) -> ExitCode {
    finish(connection, call(connection, "POST", &format!("/jobs/{id}/{verb}"), None), |job| {
        let fires = job["fires_added"]
            .as_array()
            .map(|f| format!(" (fires {})", f.iter().map(time_text).collect::<Vec<_>>().join(", ")));
        format!("{done} {id}{}\n", fires.unwrap_or_default())
    })
}

/// `KEY=VALUE` pairs as an object.
fn labels(pairs: &[String]) -> Result<serde_json::Map<String, Value>, String> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), json!(value))),
            _ => Err(format!("--label: {pair:?} is not KEY=VALUE")),
        })
        .collect()
}

/// `sundial flow …`: flow-control keys.
pub fn flow(connection: &Connection, command: &FlowCommand) -> ExitCode {
    let key_text = |key: &Value| {
        format!(
            "{:<24} {:>6} {:>11} {:>8} {:>6} {:>5} {:>9} {:>8}\n",
            key["key"].as_str().unwrap_or("?"),
            key["parallelism"].as_u64().map_or("-".into(), |p| p.to_string()),
            key["rate"].as_u64().map_or("-".into(), |r| format!("{r}/{}ms", key["period_ms"])),
            if key["ordered"] == true { "ordered" } else { "-" },
            if key["paused"] == true { "paused" } else { "-" },
            key["jobs"],
            key["in_flight"],
            key["backlog"],
        )
    };
    let header = format!(
        "{:<24} {:>6} {:>11} {:>8} {:>6} {:>5} {:>9} {:>8}\n",
        "KEY", "PARALL", "RATE", "ORDER", "PAUSED", "JOBS", "IN FLIGHT", "BACKLOG"
    );
    let (method, path) = match command {
        FlowCommand::List => ("GET", "/flow-keys".to_string()),
        FlowCommand::Get { key } => ("GET", format!("/flow-keys/{key}")),
        FlowCommand::Pause { key } => ("POST", format!("/flow-keys/{key}/pause")),
        FlowCommand::Resume { key } => ("POST", format!("/flow-keys/{key}/resume")),
    };
    finish(connection, call(connection, method, &path, None), |body| match body["flow_keys"].as_array() {
        Some(keys) => header.clone() + &keys.iter().map(key_text).collect::<String>(),
        None => header.clone() + &key_text(body),
    })
}

fn create_request(args: &CreateArgs) -> Result<Value, String> {
    if let Some(request) = &args.request {
        let text = if request == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| format!("reading stdin: {e}"))?;
            text
        } else {
            request.clone()
        };
        let mut request: Value = serde_json::from_str(&text).map_err(|e| format!("--request: not JSON: {e}"))?;
        if let (Some(id), Some(object)) = (&args.id, request.as_object_mut()) {
            object.insert("id".into(), json!(id));
        }
        return Ok(request);
    }
    let mut request = json!({});
    let url = args.url.as_ref().ok_or("--url is required (or give a whole --request)")?;
    request["url"] = json!(url);
    match (&args.delay, &args.at, &args.cron) {
        (Some(delay), None, None) => request["delay"] = json!(delay),
        (None, Some(at), None) => {
            request["run_at"] = at.parse::<u64>().map_or_else(|_| json!(at), |ms| json!(ms));
        }
        (None, None, Some(cron)) => request["cron"] = json!(cron),
        _ => return Err("give exactly one of --delay, --at or --cron".into()),
    }
    if let Some(zone) = &args.time_zone {
        request["time_zone"] = json!(zone);
    }
    if let Some(body) = &args.body_json {
        request["json"] = serde_json::from_str(body).map_err(|e| format!("--body-json: not JSON: {e}"))?;
    }
    if let Some(method) = &args.method {
        request["method"] = json!(method);
    }
    if let Some(id) = &args.id {
        request["id"] = json!(id);
    }
    if !args.label.is_empty() {
        request["labels"] = Value::Object(labels(&args.label)?);
    }
    let mut retry = serde_json::Map::new();
    if let Some(attempts) = args.max_attempts {
        retry.insert("max_attempts".into(), json!(attempts));
    }
    if let Some(initial) = args.initial_backoff_ms {
        retry.insert("initial_backoff_ms".into(), json!(initial));
    }
    if let Some(backoff) = &args.backoff {
        let delays: Result<Vec<u64>, _> = backoff.split(',').map(|d| d.trim().parse::<u64>()).collect();
        retry.insert("backoff".into(), delays.map_or_else(|_| json!(backoff), |d| json!(d)));
    }
    if !retry.is_empty() {
        request["retry"] = Value::Object(retry);
    }
    if args.on_success.is_some() || args.on_failure.is_some() {
        request["callbacks"] = json!({"on_success": args.on_success, "on_failure": args.on_failure});
        let callbacks = request["callbacks"].as_object_mut().expect("an object");
        callbacks.retain(|_, v| !v.is_null());
    }
    if let Some(key) = &args.flow_key {
        let mut flow = json!({"key": key, "parallelism": args.parallelism, "rate": args.rate, "period": args.period});
        if args.ordered {
            flow["ordered"] = json!(true);
        }
        flow.as_object_mut().expect("an object").retain(|_, v| !v.is_null());
        request["flow"] = flow;
    }
    if let Some(n) = args.pause_after_failures {
        request["pause_after_failures"] = json!(n);
    }
    if args.dst_repeated.is_some() || args.dst_missing.is_some() {
        let mut dst = json!({"repeated": args.dst_repeated, "missing": args.dst_missing});
        dst.as_object_mut().expect("an object").retain(|_, v| !v.is_null());
        request["dst"] = dst;
    }
    if let Some(secret) = &args.secret {
        request["secret"] = json!(secret);
    }
    if let Some(next) = &args.secret_next {
        request["secret_next"] = json!(next);
    }
    Ok(request)
}

pub fn dlq(connection: &Connection, command: &DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List => finish(connection, call(connection, "GET", "/dlq", None), |body| {
            let mut text = format!("{:<38} {:<15} {:>8}  REASON\n", "ID", "FIRE_MS", "ATTEMPTS");
            for letter in body["dead_letters"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "{:<38} {:<15} {:>8}  {}\n",
                    letter["id"].as_str().unwrap_or("?"),
                    letter["fire_ms"],
                    letter["attempts"],
                    letter["reason"].as_str().unwrap_or("")
                ));
            }
            text
        }),
        DlqCommand::Redrive { id, fire_ms } => {
            let path = format!("/dlq/{id}/{fire_ms}/redrive");
            finish(connection, call(connection, "POST", &path, None), |_| format!("redriven {id} fire {fire_ms}\n"))
        }
        DlqCommand::Purge { id: Some(id), .. } => {
            finish(connection, call(connection, "DELETE", &format!("/dlq/{id}"), None), |_| format!("purged {id}\n"))
        }
        DlqCommand::Purge { id: None, all: true } => {
            finish(connection, call(connection, "DELETE", "/dlq", None), |_| "purged every dead letter\n".into())
        }
        DlqCommand::Purge { id: None, all: false } => {
            eprintln!("sundial: name a job id, or give --all to purge every dead letter");
            ExitCode::from(2)
        }
    }
}

pub fn status(connection: &Connection) -> ExitCode {
    finish(connection, call(connection, "GET", "/health", None), |h| {
        let jobs = &h["jobs"];
        format!(
            "node {} {} ({}), cluster {}\n  {} partitions on {} shards ({}, log {})\n  jobs: {} pending, {} running, {} completed, {} failed, {} cancelled; {} dead letters\n  dispatch: {} queued, {} running; limits: {} of {} live jobs\n  memory: {} MiB\n",
            h["node_id"],
            h["status"].as_str().unwrap_or("?"),
            h["role"].as_str().unwrap_or("?"),
            h["cluster_id"].as_str().unwrap_or("?"),
            h["partitions"],
            h["shards"],
            h["runtime"].as_str().unwrap_or("?"),
            h["log_backend"].as_str().unwrap_or("?"),
            jobs["pending"],
            jobs["in_progress"],
            jobs["completed"],
            jobs["failed"],
            jobs["cancelled"],
            h["dead_letters"],
            h["dispatch"]["queued"],
            h["dispatch"]["running"],
            h["limits"]["live_jobs"],
            h["limits"]["max_jobs"],
            h["memory"]["resident_bytes"].as_u64().unwrap_or(0) >> 20,
        )
    })
}

fn job_text(job: &Value) -> String {
    let schedule = &job["schedule"];
    let when = match job["type"].as_str() {
        Some("recurrente") => format!(
            "cron {:?} in {}",
            schedule["cron_expression"].as_str().unwrap_or("?"),
            schedule["time_zone"].as_str().unwrap_or("UTC")
        ),
        _ => format!("once at {}", time_text(&schedule["run_at_ms"])),
    };
    let fires = &job["fires"];
    format!(
        "job {}  {}{}\n  schedule   {when}\n  target     {} {}\n  next fire  {}\n  fires      {} succeeded, {} failed, {} missed\n",
        job["id"].as_str().unwrap_or("?"),
        job["status"].as_str().unwrap_or("?"),
        if job["paused"] == true { " (paused)" } else { "" },
        job["method"].as_str().unwrap_or("POST"),
        job["webhook_url"].as_str().unwrap_or("?"),
        time_text(&job["next_fire_ms"]),
        fires["succeeded"],
        fires["failed"],
        fires["missed"],
    )
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum CertsCommand {
    /// Create a cluster CA (ca.pem, ca.key) and a certificate for each named node.
    Init {
        /// Where the PEM files go (created; existing files are never overwritten).
        #[arg(long, default_value = "sundial-certs")]
        dir: PathBuf,
        /// The cluster's name (in the CA's subject).
        #[arg(long, default_value = "local")]
        cluster: String,
        /// Node names (letters, digits and '-').
        nodes: Vec<String>,
    },
    /// Issue certificates for more nodes with an existing CA (ca.pem and ca.key in --dir).
    Issue {
        #[arg(long, default_value = "sundial-certs")]
        dir: PathBuf,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

/// `sundial certs …`: the cluster's CA and node certificates (mutual TLS between nodes).
pub fn certs(command: &CertsCommand) -> ExitCode {
    use sundial_net::certs::CertificateAuthority;
    let result = match command {
        CertsCommand::Init { dir, cluster, nodes } => CertificateAuthority::generate(cluster)
            .and_then(|ca| ca.write(dir).map(|()| ca))
            .and_then(|ca| nodes.iter().try_for_each(|node| ca.write_node(dir, node)))
            .map(|()| format!("wrote ca.pem, ca.key{} in {}", node_files(nodes), dir.display())),
        CertsCommand::Issue { dir, nodes } => CertificateAuthority::load(dir)
            .and_then(|ca| nodes.iter().try_for_each(|node| ca.write_node(dir, node)))
            .map(|()| format!("wrote{} in {}", node_files(nodes).trim_start_matches(','), dir.display())),
    };
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sundial: {e}");
            ExitCode::FAILURE
        }
    }
}

fn node_files(nodes: &[String]) -> String {
    nodes.iter().map(|n| format!(", {n}.pem, {n}.key")).collect()
}

/// `sundial dev-cluster`: a local cluster for newcomers and tests.
#[derive(clap::Args, Debug)]
pub struct DevClusterArgs {
    /// Members to start (1..=9).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Folder for the certificates (made once) and each node's data (node-ID).
    #[arg(long, default_value = "sundial-dev")]
    pub dir: PathBuf,
    /// Node i serves HTTP on this port + i.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Node i serves the binary protocol on this port + i.
    #[arg(long, default_value_t = 7070)]
    pub binary_port: u16,
    /// Node i listens for its peers (QUIC) on this port + i.
    #[arg(long, default_value_t = 7400)]
    pub peer_port: u16,
    /// Partitions of the new cluster.
    #[arg(long, default_value_t = 16)]
    pub partitions: u32,
}

/// A member that ends this soon after it started has failed to start.
const DEV_MEMBER_QUICK_EXIT: Duration = Duration::from_secs(5);
/// Quick exits in a row after which a member is left stopped (its ports taken, say).
const DEV_MEMBER_QUICK_EXITS_MAX: u32 = 3;

/// Set by SIGINT or SIGTERM: the dev cluster stops rather than start a member again.
static DEV_CLUSTER_STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn dev_cluster_stop(_signal: libc::c_int) {
    DEV_CLUSTER_STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// One member of the dev cluster, as its supervisor knows it.
struct DevMember {
    index: u64,
    child: Option<std::process::Child>,
    started: std::time::Instant,
    quick_exits: u32,
}

/// Starts `nodes` members on loopback (certificates generated on first use), prints where
/// they listen, and keeps them running: a member that ends (killed, crashed) is started
/// again on its data, so one can be killed to watch the others take over. Ctrl-C or SIGTERM
/// stops them all.
pub fn dev_cluster(args: &DevClusterArgs) -> ExitCode {
    if !(1..=9).contains(&args.nodes) {
        eprintln!("sundial: nodes: must be within 1..=9, not {}", args.nodes);
        return ExitCode::from(2);
    }
    if let Err(e) = dev_certificates(args) {
        eprintln!("sundial: certificates: {e}");
        return ExitCode::FAILURE;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("sundial: cannot find its own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, dev_cluster_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, dev_cluster_stop as *const () as libc::sighandler_t);
    }
    let mut members: Vec<DevMember> = Vec::new();
    for index in 1..=args.nodes {
        match dev_member(&exe, args, index) {
            Ok(child) => members.push(DevMember {
                index,
                child: Some(child),
                started: std::time::Instant::now(),
                quick_exits: 0,
            }),
            Err(e) => {
                eprintln!("sundial: cannot start node {index}: {e}");
                stop_all(&mut members.into_iter().filter_map(|m| m.child).collect::<Vec<_>>());
                return ExitCode::FAILURE;
            }
        }
    }
    dev_banner(args, &members);
    // Bounded by a signal: each pass looks at every member, then sleeps.
    while !DEV_CLUSTER_STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        for member in &mut members {
            supervise(&exe, args, member);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_all(&mut members.into_iter().filter_map(|m| m.child).collect::<Vec<_>>());
    ExitCode::SUCCESS
}

/// The dev cluster's CA and node certificates, made once in `<dir>/certs`.
fn dev_certificates(args: &DevClusterArgs) -> Result<(), String> {
    use sundial_net::certs::CertificateAuthority;
    let certs = args.dir.join("certs");
    let names: Vec<String> = (1..=args.nodes).map(|i| format!("node-{i}")).collect();
    let made = if certs.join("ca.pem").exists() {
        CertificateAuthority::load(&certs).and_then(|ca| {
            names.iter().filter(|n| !certs.join(format!("{n}.pem")).exists()).try_for_each(|n| ca.write_node(&certs, n))
        })
    } else {
        CertificateAuthority::generate("dev").and_then(|ca| {
            ca.write(&certs)?;
            names.iter().try_for_each(|n| ca.write_node(&certs, n))
        })
    };
    made.map_err(|e| e.to_string())
}

/// Starts member `index` of the dev cluster on its data.
fn dev_member(exe: &std::path::Path, args: &DevClusterArgs, index: u64) -> std::io::Result<std::process::Child> {
    let offset = |base: u16| base.saturating_add(index as u16);
    let peers: Vec<String> =
        (1..=args.nodes).map(|i| format!("{i}@127.0.0.1:{}", args.peer_port.saturating_add(i as u16))).collect();
    std::process::Command::new(exe)
        .arg("server")
        .args(["--node-id", &index.to_string()])
        .arg("--data")
        .arg(args.dir.join(format!("node-{index}")))
        .args(["--http", &format!("127.0.0.1:{}", offset(args.http_port))])
        .args(["--binary", &format!("127.0.0.1:{}", offset(args.binary_port))])
        .args(["--peers", &peers.join(",")])
        .arg("--certs")
        .arg(args.dir.join("certs"))
        .args(["--partitions", &args.partitions.to_string()])
        .arg("--allow-loopback-targets")
        .spawn()
}

fn dev_banner(args: &DevClusterArgs, members: &[DevMember]) {
    println!("a {}-node cluster (data and certificates in {}):", args.nodes, args.dir.display());
    for member in members {
        let i = member.index as u16;
        let pid = member.child.as_ref().map_or(0, std::process::Child::id);
        let (http, binary) = (args.http_port.saturating_add(i), args.binary_port.saturating_add(i));
        println!("  node {i}: http://127.0.0.1:{http}  sundial://127.0.0.1:{binary}  pid {pid}");
    }
    let first = args.http_port.saturating_add(1);
    println!("see it: sundial cluster status --node http://127.0.0.1:{first}");
    println!("break it: kill -9 a node's pid; the others go on and lead its partitions, and it is started again");
    println!("stop: Ctrl-C");
}

/// Starts `member` again if it ended (unless the cluster is stopping, or it keeps ending as
/// soon as it starts).
fn supervise(exe: &std::path::Path, args: &DevClusterArgs, member: &mut DevMember) {
    let Some(status) = member.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) else { return };
    member.child = None;
    if DEV_CLUSTER_STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let index = member.index;
    member.quick_exits = if member.started.elapsed() < DEV_MEMBER_QUICK_EXIT { member.quick_exits + 1 } else { 0 };
    if member.quick_exits >= DEV_MEMBER_QUICK_EXITS_MAX {
        eprintln!(
            "sundial: node {index} ended {} times within {} s of starting ({status}); left stopped: see its log above",
            member.quick_exits,
            DEV_MEMBER_QUICK_EXIT.as_secs()
        );
        return;
    }
    match dev_member(exe, args, index) {
        Ok(child) => {
            println!("node {index} ended ({status}); started again: pid {}", child.id());
            member.child = Some(child);
            member.started = std::time::Instant::now();
        }
        Err(e) => eprintln!("sundial: node {index} ended ({status}) and could not be started again: {e}"),
    }
}

/// SIGTERM to every child, then waits for each.
fn stop_all(children: &mut [std::process::Child]) {
    for child in children.iter() {
        // SAFETY: kill only sends a signal to a process this one started.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Members, and per partition its leader, term, commit and applied indexes and lag.
    Status,
    /// Add a member (started with --join): ID@HOST:PORT, its peer address.
    Add { member: String },
    /// Remove a member: its replicas move to the others first.
    Remove { node_id: u64 },
}

/// `sundial cluster status`: the cluster as the node at `--node` sees it.
pub fn cluster(connection: &Connection, command: &ClusterCommand) -> ExitCode {
    match command {
        ClusterCommand::Status => finish(connection, call(connection, "GET", "/debug/cluster", None), cluster_text),
        ClusterCommand::Add { member } => {
            let Some((node_id, raft)) =
                member.split_once('@').and_then(|(id, raft)| Some((id.parse::<u64>().ok()?, raft)))
            else {
                eprintln!("sundial: member: {member:?} is not ID@HOST:PORT (e.g. 4@10.0.0.4:7400)");
                return ExitCode::from(2);
            };
            let body = json!({"node_id": node_id, "raft": raft});
            finish(connection, call(connection, "POST", "/cluster/members", Some(&body)), members_text)
        }
        ClusterCommand::Remove { node_id } => {
            finish(connection, call(connection, "DELETE", &format!("/cluster/members/{node_id}"), None), members_text)
        }
    }
}

fn members_text(answer: &Value) -> String {
    let members: Vec<String> = answer["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| format!("  node {} at {}\n", m["node_id"], m["raft"].as_str().unwrap_or("?")))
        .collect();
    format!("members now:\n{}", members.concat())
}

fn cluster_text(view: &Value) -> String {
    let mut text = format!(
        "cluster {} as node {} sees it\nmembers:\n",
        view["cluster_id"].as_str().unwrap_or("?"),
        view["node_id"]
    );
    for member in view["members"].as_array().into_iter().flatten() {
        text += &format!(
            "  node {:<3} {:<12} http {}  binary {}\n",
            member["node_id"],
            member["state"].as_str().unwrap_or("?"),
            member["http"].as_str().unwrap_or("?"),
            member["binary"].as_str().unwrap_or("?"),
        );
    }
    text += "partition  role      leader  term  commit  applied  lag  replicas\n";
    for p in view["partitions"].as_array().into_iter().flatten() {
        let replicas: Vec<String> = p["replicas"].as_array().into_iter().flatten().map(|r| r.to_string()).collect();
        text += &format!(
            "{:>9}  {:<8}  {:>6}  {:>4}  {:>6}  {:>7}  {:>3}  {}\n",
            p["partition"],
            p["role"].as_str().unwrap_or("?"),
            p["leader"].as_u64().map_or("-".to_string(), |l| l.to_string()),
            p["term"],
            p["commit_index"],
            p["applied_index"],
            p["replication_lag"],
            replicas.join(","),
        );
    }
    text
}
