//! The integration tests, one binary: real TLS, real HTTP/1.1 and HTTP/2,
//! a real UDP/TCP upstream, clients on many 127.x.y.z source addresses,
//! and (in `e2e`) real DNS software and clients.

mod common;

mod admin;
mod budgets;
mod cache;
mod doors;
mod doors_wire;
mod doq;
mod e2e;
mod examples_files;
mod fleet;
mod guard;
mod hardening;
mod hostile;
mod http_rows;
mod known;
mod listeners;
mod operations;
mod privacy;
mod resumption;
mod upstream;
