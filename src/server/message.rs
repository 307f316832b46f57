//! One DNS message from a transport that carries DNS messages (DNS over
//! TLS, DNS over QUIC): admission, then the parse, then the answer or the
//! refusal — each refusal answered with the DNS rcode of its row in the
//! reject table, so every such transport refuses alike.

use std::net::IpAddr;
use std::sync::Arc;

use crate::dns;
use crate::pipeline::App;
use crate::reject::{Outcome, Reject, Transport};

/// Why a message is answered at once, before any work.
#[derive(Debug)]
pub enum Early {
    /// Refused by policy (banned, over budget): the answer (`REFUSED`),
    /// and whether the connection is to be closed (a ban).
    Refused { answer: Vec<u8>, closes: bool },
    /// Not one valid query: the answer (`FORMERR`); refused and scored.
    Malformed(Vec<u8>),
}

/// A message with its two-byte length prefix (DNS over TCP, TLS, QUIC).
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(msg.len() + 2);
    f.extend_from_slice(&(msg.len().min(65535) as u16).to_be_bytes());
    f.extend_from_slice(&msg[..msg.len().min(65535)]);
    f
}

/// The cheap checks, in the order of the request flow: the client's ban
/// and budget, then the parse.
pub fn admit(app: &App, client: IpAddr, transport: Transport, msg: &[u8]) -> Result<(), Early> {
    if let Err((reason, _)) = app.admit_request(client, transport) {
        return Err(Early::Refused {
            answer: refusal(msg, reason.rcode()),
            closes: reason.closes(),
        });
    }
    if let Err(e) = dns::parse_query(msg) {
        let reason = Reject::from(e);
        app.refuse(client, reason, transport);
        return Err(Early::Malformed(refusal(msg, reason.rcode())));
    }
    Ok(())
}

/// The answer to an admitted message (cache, coalescing, upstream), or
/// its refusal (the upstream budget spent: `SERVFAIL`).
pub async fn answer(app: &Arc<App>, client: IpAddr, transport: Transport, msg: &[u8]) -> Vec<u8> {
    match app.answer_message(client, None, msg).await {
        Ok(served) => {
            app.metrics
                .requests
                .count(Outcome::Answered, transport, false);
            served.wire
        }
        Err(reason) => {
            app.refuse(client, reason, transport);
            refusal(msg, reason.rcode())
        }
    }
}

/// An answer with `rcode` to `query`: its ID, opcode and RD, and its
/// question when it has one that parses.
pub fn refusal(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    if query.len() >= 4 {
        out[..2].copy_from_slice(&query[..2]);
        out[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD
    } else {
        out[2] = 0x80;
    }
    out[3] = 0x80 | rcode; // RA
    if let Ok(q) = dns::parse_query(query) {
        out[5] = 1;
        out.extend_from_slice(q.question);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_echo_id_and_question() {
        let q = dns::query_message("a.test", 1, 0x4242, true).unwrap();
        let r = refusal(&q, crate::dns::RCODE_REFUSED);
        let m = hickory_proto::op::Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(
            m.metadata.response_code,
            hickory_proto::op::ResponseCode::Refused
        );
        assert_eq!(m.queries.len(), 1);
        let r = refusal(b"\x12\x34garbage", crate::dns::RCODE_FORMERR);
        let m = hickory_proto::op::Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.queries.is_empty());
    }
}
