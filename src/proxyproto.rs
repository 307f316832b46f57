//! PROXY protocol v1 (text) and v2 (binary) headers, read only from
//! trusted proxies, to learn the real client of a connection.
//!
//! The header is read byte-exactly (never past its end), so what follows
//! — a TLS ClientHello or an HTTP request — is left untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY protocol header")]
    Malformed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one header. `Ok(None)` is a header without an address (v1
/// `UNKNOWN`, v2 `LOCAL`): the connection is the proxy's own.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<IpAddr>, ProxyError> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head[..5]).await?;
    if &head[..5] == b"PROXY" {
        return read_v1(r).await;
    }
    r.read_exact(&mut head[5..]).await?;
    if head != V2_SIG {
        return Err(ProxyError::NotProxy);
    }
    read_v2(r).await
}

async fn read_v1<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<IpAddr>, ProxyError> {
    // At most 107 bytes in all; 5 are read. Read up to CRLF, byte by byte.
    let mut line = Vec::with_capacity(102);
    loop {
        let b = r.read_u8().await?;
        line.push(b);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() > 102 {
            return Err(ProxyError::Malformed);
        }
    }
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| ProxyError::Malformed)?;
    let mut parts = text.split(' ').filter(|p| !p.is_empty());
    match parts.next() {
        Some("UNKNOWN") => Ok(None),
        Some("TCP4") | Some("TCP6") => parts
            .next()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or(ProxyError::Malformed),
        _ => Err(ProxyError::Malformed),
    }
}

async fn read_v2<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<IpAddr>, ProxyError> {
    let ver_cmd = r.read_u8().await?;
    let fam = r.read_u8().await?;
    let len = r.read_u16().await? as usize;
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    if ver_cmd & 0xF == 0 {
        return Ok(None); // LOCAL
    }
    match fam >> 4 {
        1 if len >= 12 => Ok(Some(IpAddr::V4(Ipv4Addr::new(
            body[0], body[1], body[2], body[3],
        )))),
        2 if len >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Ok(Some(IpAddr::V6(Ipv6Addr::from(a))))
        }
        0 => Ok(None),
        _ => Err(ProxyError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_and_v2() {
        let mut v1: &[u8] = b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\nGET /";
        assert_eq!(
            read_header(&mut v1).await.unwrap(),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(v1, b"GET /");
        let mut unknown: &[u8] = b"PROXY UNKNOWN\r\n";
        assert_eq!(read_header(&mut unknown).await.unwrap(), None);
        let mut v2 = V2_SIG.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 7, 127, 0, 0, 1, 0x15, 0xb3, 1, 187,
        ]);
        v2.extend_from_slice(b"rest");
        let mut r = v2.as_slice();
        assert_eq!(
            read_header(&mut r).await.unwrap(),
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(r, b"rest");
        let mut junk: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00";
        assert!(matches!(
            read_header(&mut junk).await,
            Err(ProxyError::NotProxy)
        ));
        let mut long: &[u8] = b"PROXY x";
        assert!(read_header(&mut long).await.is_err());
    }
}
