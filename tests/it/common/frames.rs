//! Raw HTTP/2 for clients that misbehave on purpose: frames written by
//! hand over a real TLS connection, and what the server answered.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{tcp_from, tls_connector};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(4, 0, 0, &p)
}

pub fn ping() -> Vec<u8> {
    frame(6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8])
}

/// The header block of `GET path`, HPACK without Huffman or the dynamic
/// table.
pub fn get_block(path: &str) -> Vec<u8> {
    request_block(0x82, path) // :method GET
}

/// The header block of a `POST /dns-query` with `content_type`.
pub fn post_block(content_type: &str) -> Vec<u8> {
    let mut h = request_block(0x83, "/dns-query"); // :method POST
    h.push(0); // literal without indexing, new name
    for part in ["content-type", content_type] {
        push_string(&mut h, part);
    }
    h
}

/// `method` (an indexed field), `:scheme https`, `path` and
/// `:authority localhost`.
fn request_block(method: u8, path: &str) -> Vec<u8> {
    let mut h = vec![method, 0x87]; // :scheme https
    for (index, value) in [(4u8, path), (1, "localhost")] {
        h.push(index); // literal without indexing, indexed name
        push_string(&mut h, value);
    }
    h
}

/// A string literal, without Huffman coding.
fn push_string(h: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127, "one-byte HPACK length");
    h.push(s.len() as u8);
    h.extend_from_slice(s.as_bytes());
}

/// A HEADERS frame for `GET path` on `stream`.
pub fn get_headers(stream: u32, path: &str) -> Vec<u8> {
    frame(1, 0x05, stream, &get_block(path)) // END_STREAM | END_HEADERS
}

/// One frame as read: type, flags, stream and payload.
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads frames until `last` says the one just read is the one awaited:
/// every frame read, that one last; `None` when the connection ends (or
/// stays silent ten seconds) first. Reads no further than that frame.
pub async fn frames_until<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    mut last: impl FnMut(&Frame) -> bool,
) -> Option<Vec<Frame>> {
    let mut seen = Vec::new();
    loop {
        let mut head = [0u8; 9];
        let read = async {
            s.read_exact(&mut head).await?;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await?;
            Ok::<_, std::io::Error>(payload)
        };
        let payload = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()?
            .ok()?;
        let f = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        };
        let done = last(&f);
        seen.push(f);
        if done {
            return Some(seen);
        }
    }
}

/// The status of the first response on `stream`, if it is one HPACK's
/// static table holds (200, 204, 206, 304, 400, 404, 500); `None` when the
/// connection ends first.
pub async fn first_status<S: tokio::io::AsyncRead + Unpin>(s: &mut S, stream: u32) -> Option<u16> {
    let frames = frames_until(s, |f| f.kind == 1 && f.stream == stream).await?;
    let first = *frames.last()?.payload.first()?;
    let status = [200, 204, 206, 304, 400, 404, 500];
    status
        .get(usize::from(first ^ 0x80).wrapping_sub(8))
        .copied()
}

/// A TLS connection with ALPN h2 from `source`, nothing sent yet.
pub async fn h2_tls(
    addr: SocketAddr,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(Some(source.parse().unwrap()), addr).await?;
    tls_connector(b"h2")
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// [`h2_tls`] with the client's preface and an empty SETTINGS frame sent.
pub async fn h2_started(
    addr: SocketAddr,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut s = h2_tls(addr, source).await?;
    s.write_all(PREFACE).await?;
    s.write_all(&settings(&[])).await?;
    Ok(s)
}

/// Whether the server closed `s` within `wait`.
pub async fn closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}
