//! The node's edges: HTTP/JSON with the OpenAPI document, the binary protocol, the admin
//! console, and the bearer-token gate in front of all three. JSON lives here (and in the
//! versioned codecs of the wire); everything behind calls the router with typed values.

pub mod auth;
pub mod binary;
pub mod http;
pub mod ui;
