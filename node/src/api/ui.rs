//! The admin console at /ui: server-rendered HTML (every asset in the binary, nothing from
//! the internet) with a little script for live charts and the DLQ buttons. Pages read
//! through the router like the API does; actions call the API with the same token, which
//! the console keeps in a cookie (`sundial_token`) after /ui/login.

use crate::shard::ops::Answer;
use crate::shard::router::Router;
use serde_json::Value;

/// An HTML page (status, body).
pub struct Page {
    pub status: u16,
    pub html: String,
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1d232a}header{background:#1d3557;color:#fff;padding:10px 16px}header a{color:#fff;margin-right:16px;text-decoration:none}main{padding:16px}table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}th{background:#f1f3f5}.pending{color:#1864ab}.completed{color:#2b8a3e}.failed,.timeout{color:#c92a2a}.cancelled{color:#868e96}form.filters{margin:8px 0}button{cursor:pointer}.charts{display:flex;gap:16px;flex-wrap:wrap}.chart{border:1px solid #ddd;padding:8px;width:260px}.chart svg{width:240px;height:60px}.muted{color:#868e96}";

/// The console's script: live charts from /metrics, and the DLQ buttons. The token, if any,
/// comes from the `sundial_token` cookie.
const SCRIPT: &str = r#"
function token(){const m=document.cookie.match(/(?:^|; )sundial_token=([^;]*)/);return m?decodeURIComponent(m[1]):null}
async function api(method,path){const h={};const t=token();if(t)h.authorization='Bearer '+t;const r=await fetch(path,{method,headers:h});if(!r.ok){const b=await r.json().catch(()=>({}));throw new Error(r.status+' '+(b.error||''))}return r}
async function redrive(id,fire){if(!confirm('Redrive '+id+' fire '+fire+'?'))return;try{await api('POST','/dlq/'+encodeURIComponent(id)+'/'+fire+'/redrive');location.reload()}catch(e){document.getElementById('message').textContent=e.message}}
async function purge(id){if(!confirm(id?'Purge the dead letters of '+id+'?':'Purge every dead letter?'))return;try{await api('DELETE',id?'/dlq/'+encodeURIComponent(id):'/dlq');location.reload()}catch(e){document.getElementById('message').textContent=e.message}}
function sum(text,name,filter){let s=0;for(const l of text.split('\n')){if(l.startsWith(name)&&(l[name.length]==='{'||l[name.length]===' ')&&(!filter||l.includes(filter))){const v=parseFloat(l.split(' ').pop());if(!isNaN(v))s+=v}}return s}
function p99(text,name){const b={};for(const l of text.split('\n')){if(!l.startsWith(name+'_bucket{'))continue;const le=l.match(/le="([^"]+)"/)[1];b[le]=(b[le]||0)+parseFloat(l.split(' ').pop())}const les=Object.keys(b).filter(x=>x!=='+Inf').map(Number).sort((x,y)=>x-y);const total=b['+Inf']||0;if(!total)return 0;for(const le of les){if(b[String(le)]>=0.99*total)return le}return les.length?les[les.length-1]:0}
const series={fires:[],lateness:[],queue:[],failures:[]};let last=null;
function draw(id,values,unit){const el=document.getElementById(id);if(!el)return;const max=Math.max(1e-9,...values);const pts=values.map((v,i)=>(i*240/Math.max(1,values.length-1)).toFixed(1)+','+(58-56*v/max).toFixed(1)).join(' ');el.querySelector('polyline').setAttribute('points',pts);el.querySelector('.now').textContent=(values.length?values[values.length-1]:0).toFixed(unit==='ms'?1:2)+' '+unit}
async function poll(){try{const text=await (await api('GET','/metrics')).text();const now=Date.now();const fired=sum(text,'sundial_fire_lateness_seconds_count');const failures=sum(text,'sundial_webhook_outcomes_total')-sum(text,'sundial_webhook_outcomes_total','class="2xx"');if(last){const dt=(now-last.at)/1000;series.fires.push(Math.max(0,(fired-last.fired)/dt));series.failures.push(Math.max(0,(failures-last.failures)/dt))}last={at:now,fired,failures};series.lateness.push(p99(text,'sundial_fire_lateness_seconds')*1000);series.queue.push(sum(text,'sundial_dispatch_queue_depth'));for(const k in series){if(series[k].length>60)series[k].shift()}draw('chart-fires',series.fires,'/s');draw('chart-lateness',series.lateness,'ms');draw('chart-queue',series.queue,'');draw('chart-failures',series.failures,'/s')}catch(e){}}
if(document.getElementById('chart-fires')){poll();setInterval(poll,2000)}
function login(form){document.cookie='sundial_token='+encodeURIComponent(form.token.value)+'; path=/; SameSite=Strict';location.href='/ui';return false}
"#;

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · Sundial</title><link rel=\"icon\" href=\"data:,\"><style>{STYLE}</style></head><body><header><a href=\"/ui\"><b>Sundial</b></a><a href=\"/ui\">Jobs</a><a href=\"/ui/dlq\">Dead letters</a><a href=\"/ui/cluster\">Cluster</a><a href=\"/ui/login\">Token</a></header><main><h1>{title}</h1><p id=\"message\" class=\"failed\"></p>{body}</main><script>{SCRIPT}</script></body></html>",
        title = escape(title)
    )
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => escape(s),
        Value::Null => "—".into(),
        other => escape(&other.to_string()),
    }
}

fn failure(answer: Answer) -> Page {
    let message =
        answer.body_value().and_then(|b| b["error"].as_str().map(str::to_string)).unwrap_or("unavailable".into());
    Page { status: answer.status, html: layout("Error", &format!("<p class=\"failed\">{}</p>", escape(&message))) }
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(key, _)| *key == name).map(|(_, value)| value)
}

/// The page for a console request the gate refused.
pub fn refused(verdict: crate::api::auth::Verdict) -> Page {
    match verdict {
        crate::api::auth::Verdict::Limited { .. } => Page {
            status: 429,
            html: layout("Slow down", "<p>This token's request rate is exceeded; try again shortly.</p>"),
        },
        _ => Page {
            status: 401,
            html: layout("Token needed", "<p>This node requires a token: <a href=\"/ui/login\">enter it</a>.</p>"),
        },
    }
}

/// A cookie, query or path value with `%XX` escapes (and `+` as a space) decoded.
pub fn decoded(value: &str) -> String {
    let bytes = value.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A job id as one URL path segment (percent-encoded).
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Jobs shown per page.
const PAGE_SIZE: usize = 50;

/// `GET /ui`: live charts, then the jobs list with filters (status, label, due window) and
/// paging, over the oldest 1,000 jobs.
pub async fn jobs(router: &Router, query: &str) -> Page {
    let status = query_value(query, "status").map(decoded).filter(|s| !s.is_empty());
    let label = query_value(query, "label").map(decoded).filter(|s| !s.is_empty());
    let due_within_h: Option<u64> = query_value(query, "due_within_h").and_then(|v| v.parse().ok());
    let page: usize = query_value(query, "page").and_then(|v| v.parse().ok()).unwrap_or(0);
    let status_filter =
        status.as_deref().and_then(|s| sundial_engine::state::Status::ALL.iter().find(|x| x.as_str() == s).copied());
    let answer = router.list(status_filter, crate::shard::router::LIST_LIMIT_MAX).await;
    let Some(body) = answer.body_value().filter(|_| answer.status == 200) else { return failure(answer) };
    let now = sundial_dispatch::now_ms();
    let jobs: Vec<&Value> = body["jobs"].as_array().map(|jobs| jobs.iter().collect()).unwrap_or_default();
    let jobs: Vec<&Value> = jobs
        .into_iter()
        .filter(|job| match label.as_deref().and_then(|l| l.split_once('=')) {
            Some((key, value)) => job["labels"][key].as_str() == Some(value),
            None => true,
        })
        .filter(|job| match due_within_h {
            Some(hours) => job["next_fire_ms"].as_u64().is_some_and(|at| at <= now + hours * 3_600_000),
            None => true,
        })
        .collect();
    let pages = jobs.len().div_ceil(PAGE_SIZE).max(1);
    let page = page.min(pages - 1);
    let mut rows = String::new();
    for job in jobs.iter().skip(page * PAGE_SIZE).take(PAGE_SIZE) {
        let id = job["id"].as_str().unwrap_or("");
        let status = job["status"].as_str().unwrap_or("");
        rows.push_str(&format!(
            "<tr><td><a class=\"job-link\" href=\"/ui/jobs/{href}\">{id}</a></td><td class=\"{status}\">{status}</td><td>{kind}</td><td>{next}</td><td>{url}</td><td>{labels}</td></tr>",
            href = escape(&segment(id)),
            id = escape(id),
            status = escape(status),
            kind = if job["type"] == "recurrente" { "cron" } else { "once" },
            next = time_text(&job["next_fire_ms"]),
            url = text(&job["webhook_url"]),
            labels = escape(&job["labels"].as_object().map(|l| l.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(", ")).unwrap_or_default()),
        ));
    }
    let options: String = std::iter::once("")
        .chain(sundial_engine::state::Status::ALL.iter().map(|s| s.as_str()))
        .map(|s| {
            format!(
                "<option value=\"{s}\"{}>{}</option>",
                if status.as_deref() == Some(s) { " selected" } else { "" },
                if s.is_empty() { "any status" } else { s }
            )
        })
        .collect();
    let keep = format!(
        "status={}&label={}&due_within_h={}",
        escape(status.as_deref().unwrap_or("")),
        escape(label.as_deref().unwrap_or("")),
        due_within_h.map(|h| h.to_string()).unwrap_or_default()
    );
    let chart = |id: &str, title: &str| {
        format!("<div class=\"chart\" id=\"{id}\"><div>{title} <b class=\"now\">…</b></div><svg viewBox=\"0 0 240 60\"><polyline fill=\"none\" stroke=\"#1d3557\" stroke-width=\"2\" points=\"\"/></svg></div>")
    };
    let body = format!(
        "<section class=\"charts\">{}{}{}{}</section>\
         <form class=\"filters\" method=\"get\" action=\"/ui\"><select name=\"status\">{options}</select> \
         <input name=\"label\" placeholder=\"label key=value\" value=\"{label}\"> \
         <input name=\"due_within_h\" placeholder=\"due within hours\" size=\"14\" value=\"{due}\"> <button>Filter</button></form>\
         <p class=\"muted\">{count} jobs · page {shown} of {pages} {prev} {next}</p>\
         <table id=\"jobs\"><tr><th>ID</th><th>Status</th><th>Kind</th><th>Next fire</th><th>URL</th><th>Labels</th></tr>{rows}</table>",
        chart("chart-fires", "Fires/s"),
        chart("chart-lateness", "Lateness p99"),
        chart("chart-queue", "Queue depth"),
        chart("chart-failures", "Failed attempts/s"),
        label = escape(label.as_deref().unwrap_or("")),
        due = due_within_h.map(|h| h.to_string()).unwrap_or_default(),
        count = jobs.len(),
        shown = page + 1,
        prev = if page > 0 { format!("<a href=\"/ui?{keep}&page={}\">← previous</a>", page - 1) } else { String::new() },
        next = if page + 1 < pages { format!("<a href=\"/ui?{keep}&page={}\">next →</a>", page + 1) } else { String::new() },
    );
    Page { status: 200, html: layout("Jobs", &body) }
}

/// `GET /ui/jobs/{id}`: the job's spec and status, and its attempts as a timeline.
pub async fn job(router: &Router, id: &str) -> Page {
    let answer = router.job(id, crate::shard::ops::JobOp::Get).await;
    let Some(job) = answer.body_value().filter(|_| answer.status == 200) else { return failure(answer) };
    let executions = router.job(id, crate::shard::ops::JobOp::Executions).await;
    let attempts: Vec<Value> =
        executions.body_value().and_then(|b| b["executions"].as_array().cloned()).unwrap_or_default();
    let (first, last) = attempts.iter().fold((u64::MAX, 0u64), |(lo, hi), e| {
        let start = e["started_ms"].as_u64().unwrap_or(0);
        let end = e["finished_ms"].as_u64().unwrap_or(start);
        (lo.min(start), hi.max(end))
    });
    let span = (last.saturating_sub(first)).max(1) as f64;
    let mut bars = String::new();
    let mut rows = String::new();
    for (n, e) in attempts.iter().enumerate() {
        let start = e["started_ms"].as_u64().unwrap_or(0);
        let end = e["finished_ms"].as_u64().unwrap_or(start);
        let ok = e["status_code"].as_u64().is_some_and(|s| (200..300).contains(&s));
        let x = (start.saturating_sub(first)) as f64 / span * 560.0;
        let w = ((end.saturating_sub(start)) as f64 / span * 560.0).max(3.0);
        bars.push_str(&format!(
            "<rect class=\"attempt\" x=\"{x:.1}\" y=\"{y}\" width=\"{w:.1}\" height=\"12\" fill=\"{fill}\"><title>attempt {a}: {s}</title></rect>",
            y = 4 + (n % 6) * 16,
            fill = if ok { "#2b8a3e" } else { "#c92a2a" },
            a = e["attempt"],
            s = text(&e["status_code"]),
        ));
        rows.push_str(&format!(
            "<tr class=\"execution\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td><td>{}</td></tr>",
            time_text(&e["fire_ms"]),
            e["attempt"],
            time_text(&e["started_ms"]),
            text(&e["status_code"]),
            text(&e["latency_ms"]),
            // An attempt's error, or what happened to the job (a callback, an auto-pause).
            if e["error"].is_null() { text(&e["note"]) } else { text(&e["error"]) },
            text(&e["response_body"]),
        ));
    }
    let schedule = &job["schedule"];
    let when = if job["type"] == "recurrente" {
        format!("cron {} in {}", text(&schedule["cron_expression"]), text(&schedule["time_zone"]))
    } else {
        format!("once at {}", time_text(&schedule["run_at_ms"]))
    };
    let body = format!(
        "<table class=\"spec\"><tr><th>ID</th><td id=\"job-id\">{id}</td></tr><tr><th>Status</th><td id=\"job-status\" class=\"{status}\">{status}{paused}</td></tr>\
         <tr><th>Schedule</th><td>{when}</td></tr><tr><th>Target</th><td>{method} {url}</td></tr><tr><th>Next fire</th><td>{next}</td></tr>\
         <tr><th>Fires</th><td>{ok} succeeded, {failed} failed, {missed} missed</td></tr><tr><th>Created</th><td>{created}</td></tr>{flow}</table>\
         <h2>Attempts</h2><svg class=\"timeline\" viewBox=\"0 0 570 100\" width=\"570\" height=\"100\">{bars}</svg>\
         <table id=\"executions\"><tr><th>Fire</th><th>Attempt</th><th>Started</th><th>Status</th><th>Latency</th><th>Error</th><th>Response</th></tr>{rows}</table>",
        id = text(&job["id"]),
        status = text(&job["status"]),
        paused = match (&job["paused"], job["paused_reason"].as_str()) {
            (Value::Bool(true), Some(reason)) => format!(" (paused: {})", escape(reason)),
            (Value::Bool(true), None) => " (paused)".to_string(),
            _ => String::new(),
        },
        flow = job["flow"]["key"].as_str().map_or_else(String::new, |key| {
            format!("<tr><th>Flow key</th><td>{}{}</td></tr>", escape(key), if job["flow"]["ordered"] == true { " (ordered)" } else { "" })
        }),
        method = text(&job["method"]),
        url = text(&job["webhook_url"]),
        next = time_text(&job["next_fire_ms"]),
        ok = job["fires"]["succeeded"],
        failed = job["fires"]["failed"],
        missed = job["fires"]["missed"],
        created = time_text(&job["created_ms"]),
    );
    Page { status: 200, html: layout(&format!("Job {id}"), &body) }
}

/// `GET /ui/dlq`: the dead letters, each with Redrive and Purge (both confirmed).
pub async fn dead_letters(router: &Router) -> Page {
    let answer = router.dead_letters().await;
    let Some(body) = answer.body_value().filter(|_| answer.status == 200) else { return failure(answer) };
    let mut rows = String::new();
    for letter in body["dead_letters"].as_array().into_iter().flatten() {
        let id = letter["id"].as_str().unwrap_or("");
        let fire = letter["fire_ms"].as_u64().unwrap_or(0);
        let js = serde_json::to_string(id).unwrap_or_default();
        rows.push_str(&format!(
            "<tr class=\"dead-letter\"><td><a href=\"/ui/jobs/{href}\">{id}</a></td><td>{fire_time}</td><td>{attempts}</td><td>{reason}</td><td><button class=\"redrive\" onclick='redrive({js},{fire})'>Redrive</button> <button class=\"purge\" onclick='purge({js})'>Purge</button></td></tr>",
            href = escape(&segment(id)),
            id = escape(id),
            fire_time = time_text(&letter["fire_ms"]),
            attempts = letter["attempts"],
            reason = text(&letter["reason"]),
            js = escape(&js),
        ));
    }
    let body = format!(
        "<p><button id=\"purge-all\" onclick='purge(null)'>Purge all</button></p><table id=\"dead-letters\"><tr><th>Job</th><th>Fire</th><th>Attempts</th><th>Reason</th><th></th></tr>{rows}</table>"
    );
    Page { status: 200, html: layout("Dead letters", &body) }
}

/// `GET /ui/cluster`: members and the partitions this node holds, with their leaders, terms,
/// indexes and replication lag.
pub async fn cluster(router: &Router) -> Page {
    let answer = router.cluster().await;
    let Some(view) = answer.body_value().filter(|_| answer.status == 200) else { return failure(answer) };
    let members: String = view["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                m["node_id"],
                text(&m["http"]),
                text(&m["binary"]),
                text(&m["raft"]),
                text(&m["state"]),
            )
        })
        .collect();
    let partitions: String = view["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "<tr class=\"partition\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p["partition"], p["shard"], text(&p["leader"]), text(&p["role"]), p["term"], p["commit_index"], p["applied_index"], p["replication_lag"], p["jobs"]
            )
        })
        .collect();
    let body = format!(
        "<p>Cluster <b>{}</b>, {} partitions.</p><h2>Members</h2><table><tr><th>Node</th><th>HTTP</th><th>Binary</th><th>Peers (QUIC)</th><th>State</th></tr>{members}</table>\
         <h2>Partitions</h2><table id=\"partitions\"><tr><th>Partition</th><th>Shard</th><th>Leader</th><th>Role</th><th>Term</th><th>Commit</th><th>Applied</th><th>Lag</th><th>Jobs</th></tr>{partitions}</table>",
        text(&view["cluster_id"]),
        view["partition_count"],
    );
    Page { status: 200, html: layout("Cluster", &body) }
}

/// `GET /ui/login`: asks for the API token and keeps it in a cookie.
pub fn login() -> Page {
    let body = "<form onsubmit=\"return login(this)\"><input name=\"token\" type=\"password\" placeholder=\"API token\" size=\"40\"> <button>Use this token</button></form><p class=\"muted\">Kept in a cookie for this browser; the console sends it as the API's bearer token.</p>";
    Page { status: 200, html: layout("Token", body) }
}

/// Routes a console path; `None` when it is not one.
pub async fn route(router: &Router, path: &str, query: &str) -> Option<Page> {
    let segments = crate::api::path_segments(path);
    Some(match segments.as_slice() {
        ["ui"] => jobs(router, query).await,
        ["ui", "jobs", id] => job(router, &decoded(id)).await,
        ["ui", "dlq"] => dead_letters(router).await,
        ["ui", "cluster"] => cluster(router).await,
        ["ui", "login"] => login(),
        ["ui", ..] => Page { status: 404, html: layout("Not found", "<p>No such page.</p>") },
        _ => return None,
    })
}

/// Unix milliseconds as RFC 3339 (UTC, whole seconds), or "-".
pub fn time_text(ms: &Value) -> String {
    ms.as_i64().and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()).map_or_else(
        || "-".to_string(),
        |t| t.round(jiff::Unit::Second).map_or_else(|_| t.to_string(), |t| t.to_string()),
    )
}
