//! Test harness: a private CA and certificate, a scriptable UDP/TCP
//! upstream that counts what it is asked, the proxy on ephemeral loopback
//! ports, and HTTP/1.1 and HTTP/2 clients over real TLS that can bind any
//! 127.x.y.z source address to play many clients.
//!
//! - [`pki`]: the test CA and certificates.
//! - [`upstreams`]: the scriptable UDP/TCP upstream, a silent one, a DNS
//!   over TLS one.
//! - [`clients`]: DNS queries, HTTP/1.1, HTTP/2 and HTTP/3 clients from any
//!   source address.
//! - [`harness`]: the proxy in process and as a service, the admin
//!   listener, metrics, waiting for a condition.
//! - [`frames`]: raw HTTP/2 frames over TLS, for clients that misbehave.

mod clients;
mod frames;
mod harness;
mod pki;
mod redis;
mod upstreams;

pub use clients::*;
pub use frames::*;
pub use harness::*;
pub use pki::*;
pub use redis::*;
pub use upstreams::*;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
pub use doh_proxy::app::{self, Running};
use doh_proxy::config::{Config, UpstreamSpec};
pub use doh_proxy::server::listener::Kind;
use hickory_proto::op::Message;
use hickory_proto::op::{MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
