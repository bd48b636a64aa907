//! Which web pages and host names the HTTP API answers. Browsers let any page send requests
//! to any address, the node's loopback ports included; two checks keep pages from driving a
//! node: a request a browser sends for a page of another origin is refused unless that origin
//! is allowed (`allowed_origins`, whose pages then get CORS answers), and a node bound to
//! loopback answers only loopback host names (a page on a name re-pointed at 127.0.0.1, DNS
//! rebinding, is refused). Clients that are not browsers send no `Origin` and are not affected.

use hyper::header::{HeaderMap, HeaderValue};
use std::net::IpAddr;

/// What a preflight may ask for (the API's methods and the headers its clients send).
const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE";
const ALLOWED_HEADERS: &str = "authorization, content-type, prefer, traceparent, tracestate";
/// What an allowed page may read of an answer besides the simple headers.
const EXPOSED_HEADERS: &str = "retry-after, preference-applied, location, www-authenticate";
/// How long a browser may keep a preflight's answer, seconds.
const PREFLIGHT_MAX_AGE_S: &str = "600";

#[derive(Clone, Debug, Default)]
pub struct OriginPolicy {
    /// The HTTP listener is bound to a loopback address.
    pub loopback_only: bool,
    /// Origins (`scheme://host[:port]`, lower-case) whose pages may call the API.
    pub allowed_origins: Vec<String>,
}

/// What the policy says of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Served as it is (no `Origin`, or the node's own).
    Served,
    /// Served, and its answer carries CORS headers for this allowed origin.
    ServedTo(String),
    /// A CORS preflight of an allowed origin: answered 204 with what it may do.
    Preflight(String),
    /// Refused: (code, message).
    Refused(&'static str, String),
}

impl OriginPolicy {
    pub fn admit(&self, method: &str, headers: &HeaderMap) -> Admission {
        let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        if self.loopback_only && !host.is_empty() && !is_loopback_host(&host) {
            let message = format!(
                "this node listens on loopback and answers loopback host names only, not {host:?}: a proxy in front of it must pass a loopback Host (or bind --http to another address)"
            );
            return Admission::Refused("host_refused", message);
        }
        let Some(origin) = headers.get("origin") else { return Admission::Served };
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/').to_ascii_lowercase();
        let authority = origin.split_once("://").map(|(_, authority)| authority);
        if authority.is_some_and(|authority| !host.is_empty() && authority == host) {
            return Admission::Served;
        }
        if self.allowed_origins.contains(&origin) {
            return match (method, headers.contains_key("access-control-request-method")) {
                ("OPTIONS", true) => Admission::Preflight(origin),
                _ => Admission::ServedTo(origin),
            };
        }
        let message = format!(
            "requests from pages of {origin:?} are refused; a node lets an origin's pages call it with --allow-origin"
        );
        Admission::Refused("origin_refused", message)
    }
}

/// Adds the CORS headers that let pages of `origin` read an answer.
pub fn allow_reading(headers: &mut HeaderMap, origin: &str) {
    if let Ok(origin) = HeaderValue::from_str(origin) {
        headers.insert("access-control-allow-origin", origin);
        headers.insert("access-control-expose-headers", HeaderValue::from_static(EXPOSED_HEADERS));
        headers.insert("vary", HeaderValue::from_static("origin"));
    }
}

/// Adds what a preflight's answer says pages of `origin` may send.
pub fn allow_sending(headers: &mut HeaderMap, origin: &str) {
    allow_reading(headers, origin);
    headers.insert("access-control-allow-methods", HeaderValue::from_static(ALLOWED_METHODS));
    headers.insert("access-control-allow-headers", HeaderValue::from_static(ALLOWED_HEADERS));
    headers.insert("access-control-max-age", HeaderValue::from_static(PREFLIGHT_MAX_AGE_S));
}

/// Whether a `Host` value (lower-case, maybe with a port) names loopback: `localhost` and
/// names under it, or a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(
            host,
            |(name, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            },
        ),
    };
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("a header value"));
        }
        map
    }

    #[test]
    fn a_loopback_node_answers_loopback_names_only() {
        let policy = OriginPolicy { loopback_only: true, allowed_origins: vec![] };
        for host in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "api.localhost:1", "[::1]:8080", "127.1.2.3"] {
            assert_eq!(policy.admit("GET", &headers(&[("host", host)])), Admission::Served, "{host}");
        }
        for host in ["evil.example:8080", "10.0.0.1:8080", "127.0.0.1.evil.example", "[::2]:80", "localhost.evil"] {
            let admitted = policy.admit("GET", &headers(&[("host", host)]));
            assert!(matches!(admitted, Admission::Refused("host_refused", _)), "{host}: {admitted:?}");
        }
        let open = OriginPolicy { loopback_only: false, allowed_origins: vec![] };
        assert_eq!(open.admit("GET", &headers(&[("host", "sundial.example:8080")])), Admission::Served);
    }

    #[test]
    fn pages_of_other_origins_are_refused_unless_allowed() {
        let allowed = "https://admin.example".to_string();
        let policy = OriginPolicy { loopback_only: false, allowed_origins: vec![allowed.clone()] };
        let from = |origin: &str, method: &str, preflight: bool| {
            let mut pairs = vec![("host", "sundial.example:8080"), ("origin", origin)];
            if preflight {
                pairs.push(("access-control-request-method", "POST"));
            }
            policy.admit(method, &headers(&pairs))
        };
        assert_eq!(from("http://sundial.example:8080", "POST", false), Admission::Served, "its own pages");
        assert!(matches!(from("https://evil.example", "POST", false), Admission::Refused("origin_refused", _)));
        assert!(matches!(from("null", "POST", false), Admission::Refused("origin_refused", _)));
        assert_eq!(from("https://ADMIN.example/", "POST", false), Admission::ServedTo(allowed.clone()));
        assert_eq!(from("https://admin.example", "OPTIONS", true), Admission::Preflight(allowed));
        assert!(matches!(from("https://evil.example", "OPTIONS", true), Admission::Refused(..)));
    }
}
