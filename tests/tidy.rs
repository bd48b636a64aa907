//! The tidy test: the rules of the house that the compiler does not check. Each crate's
//! forbidden dependencies and imports (the deterministic core does no I/O, leaves never
//! import upward, the load generator and the fault harness speak the protocol), a `//!`
//! line opening every source file, no function over 70 lines, and no `unwrap()`/`expect()`
//! in non-test code without a `// Never fails:` reason. Existing exceptions are listed here
//! and the lists may only shrink: a listed item that now obeys fails the test until removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lines a function may span (signature to closing brace).
const FUNCTION_LINES_MAX: usize = 70;

/// Dependencies (from `[dependencies]`) each crate must not have.
const FORBIDDEN_DEPENDENCIES: &[(&str, &[&str])] = &[
    // The deterministic core: no runtime, sockets, TLS or HTTP client; no crate above it.
    (
        "engine",
        &[
            "tokio",
            "hyper",
            "hyper-util",
            "hyper-rustls",
            "quinn",
            "rustls",
            "io-uring",
            "libc",
            "sundial-dispatch",
            "sundial-node",
        ],
    ),
    ("consensus", &["tokio", "quinn", "rustls", "hyper", "sundial-wal", "sundial-engine", "sundial-node"]),
    ("wal", &["tokio", "sundial-consensus", "sundial-engine", "sundial-dispatch", "sundial-node", "sundial-net"]),
    ("net", &["sundial-engine", "sundial-dispatch", "sundial-node", "sundial-consensus", "sundial-wal"]),
    ("dispatch", &["sundial-node", "sundial-consensus", "sundial-wal", "sundial-net", "quinn"]),
    // The load generator and the harness speak the protocol (sundial-net), like any client.
    ("loadgen", &["sundial-engine", "sundial-dispatch", "sundial-node", "sundial-consensus", "sundial-wal"]),
    // jepsen's one exception: sundial-wal, whose recovery finds where a torn tail may be cut.
    ("jepsen", &["sundial-engine", "sundial-dispatch", "sundial-node", "sundial-consensus"]),
];

/// What a deterministic core must not name: clocks (any `::now()` — `Instant`, `SystemTime`,
/// jiff's `Timestamp`/`Zoned` — and `elapsed()`), sockets, threads, files, the environment,
/// the async runtime; grouped imports (`use std::{fs, …}`) are caught by the `std::{` rule.
const CORE_FORBIDDEN: [&str; 10] = [
    "::now()",
    ".elapsed()",
    "UNIX_EPOCH",
    "std::net",
    "tokio",
    "std::thread",
    "std::fs",
    "std::env",
    "std::{",
    "std::process",
];

/// Text that must not appear in a crate's `src/`, with why.
const FORBIDDEN_IMPORTS: &[(&str, &[&str], &str)] = &[
    ("engine", &CORE_FORBIDDEN, "the core takes time and input as arguments and does no I/O"),
    ("consensus", &CORE_FORBIDDEN, "Raft is a pure state machine: the caller owns time and I/O"),
    (
        "wal",
        &["sundial_engine", "sundial_node", "sundial_consensus", "sundial_dispatch"],
        "a leaf imports no one above",
    ),
    (
        "consensus",
        &["sundial_engine", "sundial_node", "sundial_wal", "sundial_dispatch"],
        "a leaf imports no one above",
    ),
    (
        "net",
        &["sundial_engine", "sundial_node", "sundial_dispatch", "sundial_consensus"],
        "a leaf imports no one above",
    ),
    ("engine", &["sundial_node", "sundial_dispatch"], "the core imports no shell"),
    (
        "loadgen",
        &["sundial_engine", "sundial_node", "sundial_dispatch", "sundial_consensus"],
        "a client of the protocol",
    ),
    (
        "jepsen",
        &["sundial_engine", "sundial_node", "sundial_dispatch", "sundial_consensus"],
        "a client of the protocol",
    ),
];

/// Calls allowed only under one folder of a crate: (call, crate folder, allowed folder, why).
const OWNED_CALLS: &[(&str, &str, &str, &str)] =
    &[("log_mut(", "node/src/", "node/src/replica/", "a partition's log has one owner, its replica")];

/// jepsen may use sundial-wal only for the torn-tail fault (its recovery scan).
const JEPSEN_WAL_USES_ALLOWED: &[&str] = &["sundial_wal::recovery"];

/// Functions over `FUNCTION_LINES_MAX` lines when this test was written (`path::name`).
/// Shrink it: split a function, then delete its line here.
const LONG_FUNCTIONS_ALLOWED: &[&str] = &[
    "consensus/sim/src/lib.rs::nemesis",
    "consensus/src/wire.rs::encode_message",
    "dispatch/src/runtime.rs::finish_many",
    "dispatch/src/runtime.rs::fire_due_jobs",
    "dispatch/src/runtime.rs::take_effect",
    "engine/src/job.rs::validate",
    "engine/src/request.rs::parse_sundial",
    "engine/src/state.rs::apply",
    "engine/src/state.rs::attempt_finished",
    "engine/src/state.rs::fire_started",
    "engine/src/state.rs::upsert",
    "jepsen/src/checker/deliveries.rs::check",
    "jepsen/src/report.rs::markdown",
    "jepsen/src/report.rs::timeline_svg",
    "jepsen/src/run.rs::run",
    "loadgen/src/drive.rs::drive",
    "loadgen/src/scenario/fire.rs::fire",
    "loadgen/src/scenario/mixed.rs::mixed",
    "loadgen/src/sink.rs::account",
    "node/src/api/http.rs::bulk",
    "node/src/api/http.rs::route",
    "node/src/api/ui.rs::job",
    "node/src/api/ui.rs::jobs",
    "node/src/bin/sundial/cli.rs::create_request",
    "node/src/bin/sundial/cli.rs::job",
    "node/src/config.rs::resolve",
    "node/src/obs/metrics.rs::new",
    "node/src/replica/partition.rs::process",
    "node/src/shard/mod.rs::run",
    "wal/src/log.rs::recover_segment",
];

/// `unwrap()`/`expect()` in non-test code without a `// Never fails:` reason, per file, when
/// this test was written. A count may only fall: give each a reason or remove it.
const UNJUSTIFIED_PANICS_ALLOWED: &[(&str, usize)] = &[
    ("node/src/shard/requests.rs", 2),
    ("consensus/src/raft.rs", 5),
    ("consensus/src/storage.rs", 1),
    ("consensus/src/wire.rs", 2),
    ("dispatch/src/lib.rs", 8),
    ("engine/src/sign.rs", 1),
    ("engine/src/state.rs", 9),
    ("engine/src/wheel.rs", 1),
    ("loadgen/src/histogram.rs", 1),
    ("loadgen/src/reference.rs", 1),
    ("loadgen/src/timeline.rs", 1),
    ("net/src/cluster.rs", 1),
    ("net/src/codec.rs", 4),
    ("node/src/api/auth.rs", 1),
    ("node/src/api/http.rs", 4),
    ("node/src/bin/sundial/cli.rs", 3),
    ("node/src/cluster/members.rs", 1),
    ("node/src/cluster/mesh.rs", 2),
    ("node/src/replica/partition.rs", 2),
    ("node/src/shard/router.rs", 2),
    ("wal/src/atomic.rs", 2),
    ("wal/src/format.rs", 1),
    ("wal/src/log.rs", 12),
    ("wal/src/recovery.rs", 2),
    ("wal/src/segment.rs", 1),
    ("wal/src/sync.rs", 2),
    ("wal/src/typed.rs", 1),
];

/// Crates whose `src/` is test tooling, where a failed expectation is the test failing.
const TEST_TOOLING: &[&str] = &["consensus/sim"];

/// Workspace members, as folders.
const CRATES: &[&str] =
    &["wal", "consensus", "consensus/sim", "engine", "dispatch", "net", "node", "loadgen", "jepsen", "tests"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// Every `.rs` file under `dir`, recursively, as paths relative to `root`.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root.join(dir)) else { return };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().to_string();
        let relative = dir.join(&name);
        let kind = entry.file_type().expect("a file type");
        if kind.is_dir() && !matches!(name.as_str(), "target" | "fuzz" | "node_modules" | "browser") {
            rust_files(root, &relative, out);
        } else if kind.is_file() && name.ends_with(".rs") {
            out.push(relative);
        }
    }
}

fn source_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for krate in CRATES {
        let mut found = Vec::new();
        rust_files(root, Path::new(krate), &mut found);
        // A nested member (consensus/sim) is checked as its own crate, not its parent's.
        let nested: Vec<&str> = CRATES.iter().filter(|c| c.starts_with(&format!("{krate}/"))).copied().collect();
        files.extend(found.into_iter().filter(|f| !nested.iter().any(|n| f.starts_with(n))));
    }
    files
}

/// The part of a source file that is not a `#[cfg(test)]` module.
fn non_test_part(text: &str) -> &str {
    // The attribute on its own line, followed by a `mod` (a comment or a `use` that mentions
    // it does not end the checked part).
    let module_at = text.match_indices("\n#[cfg(test)]\n").find(|(at, found)| {
        let rest = &text[at + found.len()..];
        rest.starts_with("mod ") || rest.starts_with("pub mod ")
    });
    module_at.map_or(text, |(at, _)| &text[..at])
}

fn is_non_test_source(path: &Path) -> bool {
    let text = path.to_string_lossy();
    text.contains("/src/") && !TEST_TOOLING.iter().any(|t| text.starts_with(&format!("{t}/")))
}

/// The names in a manifest's `[dependencies]` table.
/// The crates a manifest depends on outside tests: every `[dependencies]` table (also per
/// target, and `[dependencies.NAME]`), by the name of the package (`package = "…"` renames).
fn dependencies(manifest: &str) -> Vec<String> {
    let mut table = String::new();
    let mut names = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            table = line.trim_matches(['[', ']']).to_string();
            if let Some(name) = table.strip_prefix("dependencies.") {
                names.push(name.to_string());
            }
            continue;
        }
        let normal = table == "dependencies" || (table.starts_with("target.") && table.ends_with(".dependencies"));
        if normal && !line.is_empty() && !line.starts_with('#') {
            let key = line.split(['=', '.', ' ']).next().unwrap_or_default().trim();
            let renamed = line.split("package = \"").nth(1).and_then(|rest| rest.split('"').next());
            names.push(renamed.unwrap_or(key).to_string());
        } else if table.starts_with("dependencies.") && line.starts_with("package") {
            if let Some(package) = line.split('"').nth(1) {
                names.push(package.to_string());
            }
        }
    }
    names
}

/// `name` is `forbidden` or one of its family (`hyper` forbids `hyper-tls` too).
fn is_forbidden(name: &str, forbidden: &str) -> bool {
    name == forbidden || name.starts_with(&format!("{forbidden}-"))
}

fn check_dependencies(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (krate, forbidden) in FORBIDDEN_DEPENDENCIES {
        let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap_or_default();
        for name in dependencies(&manifest) {
            if forbidden.iter().any(|f| is_forbidden(&name, f)) {
                problems.push(format!("{krate}/Cargo.toml: depends on {name}, which {krate} must not"));
            }
        }
    }
    problems
}

fn check_imports(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    for (krate, forbidden, why) in FORBIDDEN_IMPORTS {
        let prefix = format!("{krate}/src/");
        for file in files.iter().filter(|f| f.to_string_lossy().starts_with(&prefix)) {
            let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            for (number, line) in text.lines().enumerate() {
                for word in forbidden.iter().filter(|w| line.contains(*w)) {
                    problems.push(format!("{}:{}: `{word}` ({why})", file.display(), number + 1));
                }
            }
        }
    }
    // Its tests may reopen a log to check the cut; its code uses the recovery scan only.
    for file in files.iter().filter(|f| f.starts_with("jepsen/src")) {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        for (number, line) in non_test_part(&text).lines().enumerate() {
            let uses_wal = line.contains("sundial_wal");
            if uses_wal && !JEPSEN_WAL_USES_ALLOWED.iter().any(|allowed| line.contains(allowed)) {
                problems.push(format!(
                    "{}:{}: jepsen uses sundial_wal beyond its recovery scan",
                    file.display(),
                    number + 1
                ));
            }
        }
    }
    problems
}

fn check_owned_calls(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    for (call, scope, owner, why) in OWNED_CALLS {
        let outside = files.iter().filter(|f| f.starts_with(scope) && !f.starts_with(owner));
        for file in outside {
            let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            for (number, _) in text.lines().enumerate().filter(|(_, line)| line.contains(call)) {
                problems.push(format!("{}:{}: `{call}` outside {owner} ({why})", file.display(), number + 1));
            }
        }
    }
    problems
}

fn check_headers(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        if !text.starts_with("//!") {
            problems.push(format!("{}: the first line is not a `//!` saying what the file is for", file.display()));
        }
    }
    problems
}

/// Functions in non-test code and their length in lines, as `path::name`. rustfmt's layout
/// is relied on: a body ends at the first line that is its opening line's indent plus `}`.
fn function_lengths(root: &Path, files: &[PathBuf]) -> BTreeMap<String, usize> {
    let mut lengths = BTreeMap::new();
    for file in files.iter().filter(|f| f.to_string_lossy().contains("/src/")) {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        let lines: Vec<&str> = non_test_part(&text).lines().collect();
        for (start, line) in lines.iter().enumerate() {
            let Some(name) = function_name(line) else { continue };
            let opened = line.matches('{').count();
            let one_line = opened > 0 && opened == line.matches('}').count();
            let indent = &line[..line.len() - line.trim_start().len()];
            let closing = format!("{indent}}}");
            let end = if one_line { Some(0) } else { lines[start..].iter().position(|l| *l == closing) };
            let Some(end) = end else { continue };
            let key = format!("{}::{name}", file.display());
            let length = lengths.entry(key).or_insert(0);
            *length = (*length).max(end + 1);
        }
    }
    lengths
}

/// The name of the function a line opens (`fn name(` after visibility and qualifiers).
fn function_name(line: &str) -> Option<&str> {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return None;
    }
    let at = trimmed.find("fn ")?;
    let before = &trimmed[..at];
    let qualifiers_only = before.split_whitespace().all(|word| {
        matches!(word, "pub" | "async" | "const" | "unsafe" | "extern" | "default") || word.starts_with("pub(")
    });
    if !qualifiers_only || line.trim_end().ends_with(';') {
        return None;
    }
    let rest = &trimmed[at + 3..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&rest[..end])
}

fn check_function_lengths(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let lengths = function_lengths(root, files);
    let mut problems = Vec::new();
    for (key, lines) in &lengths {
        let allowed = LONG_FUNCTIONS_ALLOWED.contains(&key.as_str());
        if *lines > FUNCTION_LINES_MAX && !allowed {
            problems.push(format!("{key}: {lines} lines, over {FUNCTION_LINES_MAX}: split it"));
        }
    }
    for key in LONG_FUNCTIONS_ALLOWED {
        if lengths.get(*key).is_none_or(|lines| *lines <= FUNCTION_LINES_MAX) {
            problems.push(format!("{key}: no longer over {FUNCTION_LINES_MAX} lines (or gone): drop it from the list"));
        }
    }
    problems
}

/// `unwrap()`/`expect(` calls in non-test code without `// Never fails:` on the line or the
/// line before, per file.
fn unjustified_panics(root: &Path, files: &[PathBuf]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for file in files.iter().filter(|f| is_non_test_source(f)) {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        let lines: Vec<&str> = non_test_part(&text).lines().collect();
        for (number, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") || !(code.contains(".unwrap()") || code.contains(".expect(")) {
                continue;
            }
            let before = if number > 0 { lines[number - 1] } else { "" };
            if !line.contains("Never fails:") && !before.contains("Never fails:") {
                *counts.entry(file.display().to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

fn check_panics(root: &Path, files: &[PathBuf], allowed: &[(&str, usize)]) -> Vec<String> {
    let counts = unjustified_panics(root, files);
    let mut problems = Vec::new();
    for (file, count) in &counts {
        let limit = allowed.iter().find(|(f, _)| f == file).map_or(0, |(_, n)| *n);
        if *count > limit {
            problems.push(format!(
                "{file}: {count} unwrap()/expect() without a `// Never fails:` reason (allowed: {limit})"
            ));
        }
    }
    for (file, limit) in allowed {
        let count = counts.get(*file).copied().unwrap_or(0);
        if count < *limit {
            problems.push(format!("{file}: {count} unjustified panics now, listed as {limit}: lower the count"));
        }
    }
    problems
}

fn all_problems(root: &Path, panics_allowed: &[(&str, usize)]) -> Vec<String> {
    let files = source_files(root);
    let mut problems = check_dependencies(root);
    problems.extend(check_imports(root, &files));
    problems.extend(check_owned_calls(root, &files));
    problems.extend(check_headers(root, &files));
    problems.extend(check_function_lengths(root, &files));
    problems.extend(check_panics(root, &files, panics_allowed));
    problems
}

#[test]
fn the_workspace_keeps_the_rules_of_the_house() {
    let root = workspace_root();
    assert!(source_files(&root).len() > 100, "the tidy test found the sources");
    let problems = all_problems(&root, UNJUSTIFIED_PANICS_ALLOWED);
    assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
}

#[test]
fn the_tidy_checks_catch_each_kind_of_violation() {
    let root = tempfile::tempdir().expect("a temporary folder");
    let write = |path: &str, text: &str| {
        let path = root.path().join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("folders");
        std::fs::write(path, text).expect("written");
    };
    write("engine/Cargo.toml", "[package]\nname = \"sundial-engine\"\n\n[dependencies]\ntokio.workspace = true\n");
    let long_body = "    let x = 1;\n".repeat(FUNCTION_LINES_MAX + 1);
    write(
        "engine/src/lib.rs",
        &format!(
            "// a plain comment, not a header\nuse std::time::Instant;\nfn now() {{ Instant::now(); }}\n\nfn long() {{\n{long_body}}}\n\nfn risky(v: Option<u8>) -> u8 {{\n    v.unwrap()\n}}\n"
        ),
    );
    write("jepsen/src/lib.rs", "//! The harness.\nuse sundial_wal::log::Log;\nuse sundial_wal::recovery::scan;\n");
    write(
        "consensus/src/lib.rs",
        "//! Raft.\nuse std::{fs, thread};\n// #[cfg(test)] in a comment does not hide what follows\nfn t() -> u64 {\n    jiff::Timestamp::now().as_second()\n}\n\nfn ok(v: Option<u8>) -> u8 {\n    // Never fails: the caller checked.\n    v.unwrap()\n}\n\n#[cfg(test)]\nmod tests {\n    fn hidden(v: Option<u8>) -> u8 {\n        v.unwrap()\n    }\n}\n",
    );
    write("dispatch/Cargo.toml", "[package]\nname = \"x\"\n\n[target.'cfg(unix)'.dependencies]\nnet = { package = \"sundial-node\", path = \"..\" }\n");
    write("consensus/Cargo.toml", "[package]\nname = \"y\"\n\n[dependencies.hyper-tls]\nversion = \"1\"\n");
    write("wal/src/lib.rs", "//! The log.\nuse sundial_engine::state::State;\n");
    write("node/src/shard/mod.rs", "//! A shard.\nfn tick(r: &mut R) {\n    r.log_mut().tick();\n}\n");
    let problems = all_problems(root.path(), &[("wal/src/lib.rs", 1)]);
    let found = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(found("consensus/src/lib.rs:2: `std::{`"), "a grouped std import in the core: {problems:#?}");
    assert!(found("consensus/src/lib.rs:5: `::now()`"), "any clock read in the core: {problems:#?}");
    assert!(found("dispatch/Cargo.toml: depends on sundial-node"), "a renamed, per-target dependency: {problems:#?}");
    assert!(found("consensus/Cargo.toml: depends on hyper-tls"), "a table-form dependency of a family: {problems:#?}");
    assert!(
        !problems.iter().any(|p| p.starts_with("consensus/src/lib.rs: ")),
        "`// Never fails:` and test modules pass: {problems:#?}"
    );
    assert!(
        found("wal/src/lib.rs: 0 unjustified panics now, listed as 1"),
        "a count that fell must be lowered: {problems:#?}"
    );
    assert!(!found("jepsen/src/lib.rs:3"), "jepsen's recovery scan is allowed: {problems:#?}");
    assert!(!found("::now: "), "a one-line function is one line: {problems:#?}");
    assert!(found("engine/Cargo.toml: depends on tokio"), "a forbidden dependency: {problems:#?}");
    assert!(found("engine/src/lib.rs:3: `::now()`"), "a clock read in the core: {problems:#?}");
    assert!(found("wal/src/lib.rs:2: `sundial_engine`"), "an upward import: {problems:#?}");
    assert!(found("node/src/shard/mod.rs:3: `log_mut(` outside"), "a second owner of a log: {problems:#?}");
    assert!(found("jepsen uses sundial_wal beyond"), "jepsen past its exception: {problems:#?}");
    assert!(found("engine/src/lib.rs: the first line is not"), "a missing header: {problems:#?}");
    assert!(found("engine/src/lib.rs::long: 73 lines"), "a long function: {problems:#?}");
    assert!(found("engine/src/lib.rs: 1 unwrap()/expect()"), "an unjustified unwrap: {problems:#?}");
    // Every listed exception that the tree does not have is reported as one to remove.
    assert!(found("engine/src/request.rs::parse_sundial: no longer over"), "a stale allowlist entry: {problems:#?}");
    assert!(!found("risky: "), "a short function passes");
}
