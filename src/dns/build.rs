//! Building queries with hickory-proto, for clients: the examples, the
//! benchmarks and the tests, and the proxy's own health probes.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// A query as a stub sends it: `name` (case kept), type `qtype`, ID `id`,
/// RD set, with an EDNS(0) OPT record (payload 1232) when `edns`.
/// `None` when `name` is not a valid domain name.
pub fn query_message(name: &str, qtype: u16, id: u16, edns: bool) -> Option<Vec<u8>> {
    let name = Name::from_ascii(name).ok()?;
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, RecordType::from(qtype)));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().ok()
}

/// An upstream's answer to `key` with one A record of `ttl` (unit tests).
#[cfg(test)]
pub(crate) fn a_answer(key: &super::Key, ttl: u32, id: u16) -> Vec<u8> {
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record};
    let q = super::upstream_query(id, key);
    let mut m = Message::from_vec(&q).expect("our own query decodes");
    m.metadata.message_type = MessageType::Response;
    m.metadata.recursion_available = true;
    let name = m.queries[0].name().clone();
    m.add_answer(Record::from_rdata(
        name,
        ttl,
        RData::A(A::new(192, 0, 2, 1)),
    ));
    m.to_vec().expect("encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_queries_pass_validation_and_keep_case() {
        let q = query_message("www.Example.test", 1, 0x4242, true).unwrap();
        let p = crate::dns::parse_query(&q).unwrap();
        assert_eq!(p.id, 0x4242);
        assert!(p.key.flags().edns() && p.key.flags().rd());
        assert_eq!(p.key.name(), "www.example.test.");
        assert_eq!(&p.question[1..4], b"www");
        assert_eq!(&p.question[5..8], b"Exa");
        let plain = query_message("a.test.", 28, 1, false).unwrap();
        assert!(!crate::dns::parse_query(&plain).unwrap().key.flags().edns());
    }
}
