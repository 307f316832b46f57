//! doh-proxy: a DNS-over-HTTPS (RFC 8484) endpoint built to stay up when
//! the internet finds it.
//!
//! A request flows one way, cheapest check first:
//!
//! ```text
//! accept (ban / connection caps)   guard::admission, server::tcp
//!   → TLS                          tls, server::tcp
//!   → HTTP limits                  server::http
//!   → DoH request validation       doh
//!   → client budget                guard::budget
//!   → DNS validation               dns
//!   → cache → coalescing           cache
//!   → upstream budget → upstream   upstream
//! ```
//!
//! [`pipeline`] strings the request stages together for every transport;
//! every refusal is a row of [`reject`], which fixes its status code, its
//! metric label, whether it scores and whether it closes the connection.
//! [`config`] turns what the user typed into the [`config::Settings`] the
//! rest runs with.

#![forbid(unsafe_code)]

pub(crate) mod acme;
pub(crate) mod admin;
pub mod app;
pub mod cache;
pub mod clock;
pub mod config;
pub mod dns;
pub mod doh;
pub(crate) mod fleet;
pub mod guard;
pub(crate) mod hll;
pub mod metrics;
pub(crate) mod net;
pub(crate) mod odoh;
pub(crate) mod pipeline;
pub(crate) mod proxyproto;
pub mod reject;
pub mod server;
pub(crate) mod tickets;
pub(crate) mod tls;
pub(crate) mod upstream;
