//! doh-proxy: a DNS-over-HTTPS (RFC 8484) endpoint built to stay up when
//! the internet finds it.
//!
//! A request flows one way, cheapest check first:
//!
//! ```text
//! accept (ban / connection caps)   guard, server
//!   → TLS                          tls, server
//!   → HTTP limits                  server
//!   → DoH request validation       doh
//!   → client budget                guard
//!   → DNS validation               dns
//!   → cache → coalescing           cache
//!   → upstream budget → upstream   upstream
//! ```
//!
//! [`pipeline`] strings the request stages together; every refusal is a
//! [`reject::Reject`], which fixes its status code and its metric label.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cache;
pub mod config;
pub mod dns;
pub mod doh;
pub mod guard;
pub mod hll;
pub mod metrics;
pub mod pipeline;
pub mod proxyproto;
pub mod reject;
pub mod server;
pub mod tls;
pub mod upstream;
