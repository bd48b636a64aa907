//! Job requests as clients send them: Scheduled-DB's format unchanged, Sundial's richer one,
//! and bad requests answered with every broken rule, each naming its field.

use serde_json::json;
use sundial_engine::job::*;
use sundial_engine::request::parse_job_request;

const NOW_MS: u64 = 1_780_000_000_000; // 2026-05-28

fn fields(result: Result<JobSpec, Vec<FieldError>>) -> Vec<String> {
    let mut fields: Vec<String> = result.expect_err("refused").into_iter().map(|e| e.field).collect();
    fields.sort();
    fields
}

#[test]
fn scheduled_db_one_shot_request_is_accepted_as_is() {
    let request = json!({
        "type": "unico",
        "timestamp": "2026-06-01T09:00:00Z",
        "webhook_url": "https://example.com/hook",
        "payload": {"order": 42}
    });
    let spec = parse_job_request(&request.to_string(), NOW_MS, "generated-1").expect("valid");
    assert_eq!(spec.id, "generated-1");
    assert_eq!(spec.schedule, Schedule::Once { at_ms: 1_780_304_400_000 });
    assert_eq!(spec.target.url, "https://example.com/hook");
    assert_eq!(spec.target.method, Method::Post);
    assert_eq!(spec.target.body, br#"{"order":42}"#);
    assert_eq!(spec.target.content_type.as_deref(), Some("application/json"));
}

#[test]
fn scheduled_db_recurring_request_with_last_date_and_epoch_seconds() {
    let request = json!({
        "type": "recurrente",
        "cron_expression": "*/5 * * * *",
        "last_date": 1_790_000_000,
        "webhook_url": "http://example.com/tick"
    });
    let spec = parse_job_request(&request.to_string(), NOW_MS, "g").expect("valid");
    let Schedule::Cron(cron) = spec.schedule else { panic!("a cron job") };
    assert_eq!((cron.expression.as_str(), cron.time_zone.as_str()), ("*/5 * * * *", "UTC"));
    assert_eq!(cron.end_ms, Some(1_790_000_000_000), "epoch seconds become milliseconds");
}

#[test]
fn sundial_request_with_every_option() {
    let request = json!({
        "id": "invoice-7:reminder",
        "cron": "0 9 * * MON-FRI",
        "time_zone": "Europe/Paris",
        "start_at": NOW_MS,
        "misfire": "fire_all",
        "misfire_max": 5,
        "overlap": "allow",
        "url": "https://billing.example.com/remind",
        "method": "put",
        "headers": {"Authorization": "Bearer x", "Content-Type": "application/vnd.example+json"},
        "json": {"invoice": 7},
        "retry": {"max_attempts": 8, "initial_backoff_ms": 500, "max_backoff_ms": 60000, "multiplier": 1.5, "jitter": 0.1, "retry_on": ["5xx", 429]},
        "attempt_timeout_ms": 5000,
        "deadline_ms": 3600000,
        "priority": 0,
        "depends_on": ["invoice-7"],
        "labels": {"team": "billing"},
        "secret": "s3cret"
    });
    let spec = parse_job_request(&request.to_string(), NOW_MS, "unused").expect("valid");
    assert_eq!(spec.id, "invoice-7:reminder");
    assert_eq!(spec.target.method, Method::Put);
    assert_eq!(spec.target.headers, vec![("Authorization".to_string(), "Bearer x".to_string())]);
    assert_eq!(spec.target.content_type.as_deref(), Some("application/vnd.example+json"), "the client's type wins");
    assert_eq!(spec.retry.multiplier_permille, 1_500);
    assert_eq!(spec.retry.jitter_percent, 10);
    assert_eq!(spec.retry.retry_on, vec![StatusMatch::Class(5), StatusMatch::Exact(429)]);
    let Schedule::Cron(cron) = spec.schedule else { panic!("a cron job") };
    assert_eq!((cron.misfire, cron.overlap), (Misfire::FireAll { max: 5 }, Overlap::Allow));
}

#[test]
fn a_delay_is_counted_from_the_request_time() {
    let spec =
        parse_job_request(&json!({"delay": "90s", "url": "https://e.com"}).to_string(), NOW_MS, "g").expect("valid");
    assert_eq!(spec.schedule, Schedule::Once { at_ms: NOW_MS + 90_000 });
}

#[test]
fn every_problem_is_reported_at_once_with_its_field() {
    let request = json!({
        "id": "has space",
        "cron": "61 * * * *",
        "time_zone": "Mars/Olympus",
        "url": "ftp://example.com",
        "headers": {"Idempotency-Key": "mine"},
        "retry": {"max_attempts": 0, "multiplier": 50, "colour": "red"},
        "priority": 9,
        "depends_on": ["has space"],
        "extra": true
    });
    let got = fields(parse_job_request(&request.to_string(), NOW_MS, "g"));
    let expected = [
        "cron",
        "depends_on[0]",
        "extra",
        "headers.Idempotency-Key",
        "id",
        "priority",
        "retry.colour",
        "retry.max_attempts",
        "retry.multiplier",
        "time_zone",
        "url",
    ];
    assert_eq!(got, expected);
}

#[test]
fn jobs_that_could_never_fire_or_break_at_dispatch_are_refused_at_create() {
    let rules = |request: serde_json::Value| -> Vec<(String, String)> {
        let refused = parse_job_request(&request.to_string(), NOW_MS, "g").expect_err("refused");
        refused.into_iter().map(|e| (e.field, e.rule)).collect()
    };
    let url = "https://example.com/h";
    for at in [json!(253_402_300_800_000u64), json!(u64::MAX)] {
        let said = rules(json!({"run_at": at, "url": url}));
        assert!(said.iter().any(|(f, r)| f == "run_at" && r.contains("year 10000")), "{at}: {said:?}");
    }
    // As text, RFC 3339 has no year 10000 to give.
    assert_eq!(rules(json!({"run_at": "10000-01-01T00:00:00Z", "url": url}))[0].0, "run_at");
    // The last second of 9999 in epoch seconds is too large to be read as seconds: the
    // refusal says how it was read rather than only that it is in the past.
    let said = rules(json!({"run_at": 253_402_300_799u64, "url": url}));
    assert!(said.iter().any(|(f, r)| f == "run_at" && r.contains("read as epoch milliseconds")), "{said:?}");
    for jitter in [-0.5, 1.5] {
        let said = rules(json!({"delay": "1m", "url": url, "retry": {"jitter": jitter}}));
        assert_eq!(said, [("retry.jitter".to_string(), "must be within 0.0..=1.0".to_string())], "{jitter}");
    }
    for id in [".", ".."] {
        let said = rules(json!({"id": id, "delay": "1m", "url": url}));
        assert_eq!(said, [("id".to_string(), "must not be . or ..".to_string())], "{id}");
    }
    let said = rules(json!({"delay": "1m", "url": url, "headers": {"Content-Type": "text/plain\r\nX-Evil: 1"}}));
    assert_eq!(said.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(), ["headers.Content-Type"], "{said:?}");
    let long = "a".repeat(9_000);
    let said = rules(json!({"delay": "1m", "url": url, "headers": {"Content-Type": long}}));
    assert_eq!(said.len(), 1, "a long type is refused too: {said:?}");
    // Still accepted: the year 9999, a jitter of 0 and 1.
    for ok in [
        json!({"run_at": "9999-12-30T00:00:00Z", "url": url}),
        json!({"delay": "1m", "url": url, "retry": {"jitter": 1.0}}),
    ] {
        assert!(
            parse_job_request(&ok.to_string(), NOW_MS, "g").is_ok(),
            "{ok}: {:?}",
            parse_job_request(&ok.to_string(), NOW_MS, "g").err()
        );
    }
}

#[test]
fn missing_and_conflicting_fields_are_named() {
    assert_eq!(fields(parse_job_request(&json!({"url": "https://e.com"}).to_string(), NOW_MS, "g")), ["run_at"]);
    assert_eq!(fields(parse_job_request(&json!({"delay": 5}).to_string(), NOW_MS, "g")), ["url"]);
    let both = json!({"run_at": NOW_MS, "cron": "* * * * *", "url": "https://e.com"});
    assert_eq!(fields(parse_job_request(&both.to_string(), NOW_MS, "g")), ["cron"]);
    let stale = json!({"run_at": "2020-01-01T00:00:00Z", "url": "https://e.com"});
    assert_eq!(fields(parse_job_request(&stale.to_string(), NOW_MS, "g")), ["run_at"]);
    let scheduled_db = json!({"type": "semanal", "webhook_url": "https://e.com"});
    assert_eq!(fields(parse_job_request(&scheduled_db.to_string(), NOW_MS, "g")), ["type"]);
    let error = parse_job_request(&json!([1]).to_string(), NOW_MS, "g").expect_err("refused");
    assert_eq!(error[0].to_string(), "(body): must be a JSON object");
}

#[test]
fn a_field_given_twice_is_refused_by_name_wherever_it_is() {
    // JSON text, as clients send it: a tree would keep only the last of each pair.
    let request = r#"{"run_at": 1780000100000, "url": "https://e.com/a", "url": "https://e.com/b",
        "retry": {"max_attempts": 3, "max_attempts": 4}, "labels": {"team": "a", "team": "b"}}"#;
    let got = fields(parse_job_request(request, NOW_MS, "g"));
    assert_eq!(got, ["labels.team", "retry.max_attempts", "url"]);
    let once = r#"{"run_at": 1780000100000, "url": "https://e.com/a", "labels": {"team": "a", "Team": "b"}}"#;
    assert!(parse_job_request(once, NOW_MS, "g").is_ok(), "names differing in case are two names");
}

#[test]
fn a_json_body_is_sent_as_written_without_the_whitespace() {
    // Keys in the client's order, digits as given (a tree would sort the keys, round the
    // big number to a float and respell the exponent), escapes and spaces inside strings kept.
    let request = r#"{"delay": 0, "url": "https://e.com",
        "json": { "zeta": 1, "alpha": [ 1.50, 2e3 ], "id": 123456789012345678901234567890,
                  "text": "a \"quoted\"\tword \u00e9" }}"#;
    let spec = parse_job_request(request, NOW_MS, "g").expect("valid");
    let sent = String::from_utf8(spec.target.body).expect("utf-8");
    assert_eq!(
        sent,
        r#"{"zeta":1,"alpha":[1.50,2e3],"id":123456789012345678901234567890,"text":"a \"quoted\"\tword \u00e9"}"#
    );
    assert_eq!(spec.target.content_type.as_deref(), Some("application/json"));
    let scheduled_db =
        r#"{"type": "unico", "timestamp": 1780000100, "webhook_url": "https://e.com", "payload": {"b": 1, "a": 2}}"#;
    let spec = parse_job_request(scheduled_db, NOW_MS, "g").expect("valid");
    assert_eq!(spec.target.body, br#"{"b":1,"a":2}"#);
}

#[test]
fn names_and_values_with_escapes_are_read_as_their_text() {
    let request =
        r#"{"r\u0075n_at": 1780000100000, "url": "https:\/\/e.com\/h\u006fok", "labels": {"t\u00e9am": "x\ny"}}"#;
    let spec = parse_job_request(request, NOW_MS, "g").expect("valid");
    assert_eq!(spec.target.url, "https://e.com/hook");
    assert_eq!(spec.labels.get("téam").map(String::as_str), Some("x\ny"));
    let error = parse_job_request("{\"url\": ", NOW_MS, "g").expect_err("not JSON");
    assert_eq!(error[0].field, "(body)");
}

#[test]
fn a_body_is_checked_as_strictly_as_a_tree_would_be_though_none_is_built() {
    use sundial_engine::request::checked_json;
    let fine = br#" {"delay": 0, "url": "https://e.com", "json": {"a": [1, 2.5e3, "\u00e9\ud83d\ude00"]}} "#;
    assert!(checked_json(fine).is_ok());
    let lone_surrogate = br#"{"delay": 0, "url": "https://e.com", "json": "\ud800"}"#;
    let out_of_range = br#"{"delay": 0, "url": "https://e.com", "json": 1e400}"#;
    let deep = format!("{}1{}", "[".repeat(129), "]".repeat(129));
    let key_surrogate = br#"{"\udc00": 1}"#;
    // Why the check: reading a body in place (as the parsers do) skips these checks.
    for body in [&lone_surrogate[..], &out_of_range[..], deep.as_bytes()] {
        assert!(serde_json::from_slice::<&serde_json::value::RawValue>(body).is_ok());
    }
    for (what, body) in [
        ("a lone surrogate", &lone_surrogate[..]),
        ("a number out of range", &out_of_range[..]),
        ("129 levels", deep.as_bytes()),
        ("a name with a lone surrogate", &key_surrogate[..]),
        ("two values", &b"{} {}"[..]),
        ("not UTF-8", &b"{\"url\": \"\xff\"}"[..]),
    ] {
        assert!(checked_json(body).is_err(), "{what} is refused");
    }
}

#[test]
fn a_batch_body_gives_its_requests_as_written_or_says_why_not() {
    use sundial_engine::request::{batch_requests, BatchRefusal};
    let body = r#" {"note": 1, "jobs": [{"delay": 0, "url": "https://e.com"}, {"id": "b"}]} "#;
    assert_eq!(batch_requests(body), Ok(vec![r#"{"delay": 0, "url": "https://e.com"}"#, r#"{"id": "b"}"#]));
    assert_eq!(batch_requests("[1]"), Err(BatchRefusal::NotAnObject));
    assert_eq!(batch_requests(r#"{"jobs": [], "jobs": []}"#), Err(BatchRefusal::JobsGivenTwice));
    assert_eq!(batch_requests(r#"{"jobs": {}}"#), Err(BatchRefusal::JobsNotAnArray));
    assert_eq!(batch_requests(r#"{"other": []}"#), Err(BatchRefusal::JobsNotAnArray));
}
