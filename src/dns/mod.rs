//! DNS wire format: validating client queries, checking upstream answers,
//! and rewriting cached answers for a client.
//!
//! The structural walk is done by hand because the hot path needs byte
//! offsets (of the question, of every TTL) that a parsed message does not
//! keep; anything hickory-proto cannot read is refused too: every message
//! is decoded with it as well, except what the walk has already checked
//! to hickory's rules (a query's header, question and OPT; an answer's
//! records of the usual types, in `sound.rs`).

mod answer;
pub(crate) mod build;
mod key;
mod sound;

pub use answer::*;
pub use build::query_message;
pub use key::{Key, KeyDigest, KeyHasher};

use hickory_proto::op::Message;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// The only media type RFC 8484 defines for a DNS message over HTTP (the
/// DoH listeners and the DoH upstreams both speak it).
pub const DNS_MESSAGE: &str = "application/dns-message";

pub const HEADER_LEN: usize = 12;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_SOA: u16 = 6;
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;
/// UDP payload size advertised upstream (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;

pub(crate) const FLAG_QR: u16 = 0x8000;
pub(crate) const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
pub(crate) const FLAG_RA: u16 = 0x0080;
const FLAG_AD: u16 = 0x0020;
const FLAG_CD: u16 = 0x0010;
pub(crate) const EDNS_DO: u32 = 0x8000;

/// Why a client's DNS message is not one valid query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum QueryError {
    #[error("message too short")]
    TooShort,
    #[error("bytes after the last record")]
    TrailingBytes,
    #[error("QR bit set: a response, not a query")]
    NotAQuery,
    #[error("opcode is not QUERY")]
    Opcode,
    #[error("QDCOUNT is not 1")]
    QuestionCount,
    #[error("records in answer, authority or additional (other than OPT)")]
    UnexpectedRecords,
    #[error("invalid question name")]
    BadName,
    #[error("malformed message")]
    Malformed,
}

/// The parts of a query that change the answer, and so key the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct QueryFlags(u8);

impl QueryFlags {
    const RD: u8 = 1;
    const CD: u8 = 2;
    const AD: u8 = 4;
    const EDNS: u8 = 8;
    const DO: u8 = 16;

    pub fn rd(self) -> bool {
        self.0 & Self::RD != 0
    }
    pub fn edns(self) -> bool {
        self.0 & Self::EDNS != 0
    }
    pub fn dnssec_ok(self) -> bool {
        self.0 & Self::DO != 0
    }
}

/// A client query that passed validation.
#[derive(Debug)]
pub struct Query<'a> {
    pub id: u16,
    /// The question section exactly as the client sent it (case preserved).
    pub question: &'a [u8],
    pub key: Key,
    /// The client's EDNS(0) payload size (0 without EDNS): no answer
    /// padding goes beyond it.
    pub payload: u16,
    /// Whether the query carried an EDNS(0) Padding option (RFC 7830).
    pub padded: bool,
}

/// EDNS option code of Padding (RFC 7830).
pub const OPTION_PADDING: u16 = 12;

pub(crate) fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

pub(crate) fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Skips a possibly compressed name starting at `pos`; returns the offset
/// after it. Bounded: at most 128 labels.
pub(crate) fn skip_name(b: &[u8], mut pos: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(pos)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + len as usize,
            0xC0 => return (pos + 2 <= b.len()).then_some(pos + 2),
            _ => return None,
        }
    }
    None
}

/// Parses an uncompressed question name at offset 12; returns its end.
pub(crate) fn question_name_end(b: &[u8]) -> Result<usize, QueryError> {
    let mut pos = HEADER_LEN;
    loop {
        let len = *b.get(pos).ok_or(QueryError::TooShort)? as usize;
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 {
            return Err(QueryError::BadName);
        }
        pos += 1 + len;
        if pos - HEADER_LEN > 255 {
            return Err(QueryError::BadName);
        }
    }
    if pos - HEADER_LEN > 255 {
        return Err(QueryError::BadName);
    }
    Ok(pos)
}

/// Length of the question section (name, type, class) of a message.
pub fn question_len(b: &[u8]) -> Option<usize> {
    let end = question_name_end(b).ok()? + 4;
    (end <= b.len()).then_some(end - HEADER_LEN)
}

/// One resource record's fixed fields, as found by [`walk_record`].
pub(crate) struct RecordAt {
    pub rtype: u16,
    pub ttl_at: usize,
    pub rdata_at: usize,
    pub end: usize,
}

pub(crate) fn walk_record(b: &[u8], pos: usize) -> Option<RecordAt> {
    let p = skip_name(b, pos)?;
    if p + 10 > b.len() {
        return None;
    }
    let rtype = u16_at(b, p);
    let rdlen = u16_at(b, p + 8) as usize;
    let end = p + 10 + rdlen;
    (end <= b.len()).then_some(RecordAt {
        rtype,
        ttl_at: p + 4,
        rdata_at: p + 10,
        end,
    })
}

/// Validates a client's DNS message: exactly one well-formed query.
pub fn parse_query(b: &[u8]) -> Result<Query<'_>, QueryError> {
    if b.len() < HEADER_LEN + 5 {
        return Err(QueryError::TooShort);
    }
    let flags = u16_at(b, 2);
    if flags & FLAG_QR != 0 {
        return Err(QueryError::NotAQuery);
    }
    if (flags >> 11) & 0xF != 0 {
        return Err(QueryError::Opcode);
    }
    if u16_at(b, 4) != 1 {
        return Err(QueryError::QuestionCount);
    }
    if u16_at(b, 6) != 0 || u16_at(b, 8) != 0 {
        return Err(QueryError::UnexpectedRecords);
    }
    let name_end = question_name_end(b)?;
    let q_end = name_end + 4;
    if q_end > b.len() {
        return Err(QueryError::TooShort);
    }
    let mut kf = 0u8;
    if flags & FLAG_RD != 0 {
        kf |= QueryFlags::RD;
    }
    if flags & FLAG_CD != 0 {
        kf |= QueryFlags::CD;
    }
    if flags & FLAG_AD != 0 {
        kf |= QueryFlags::AD;
    }
    let mut pos = q_end;
    let (mut payload, mut padded) = (0u16, false);
    // Whether the walk below has seen all there is to check: the header,
    // the question and an OPT record without options or with padding
    // alone. Any other EDNS option is parsed by hickory-proto too.
    let mut walked = true;
    for _ in 0..u16_at(b, 10) {
        let r = walk_record(b, pos).ok_or(QueryError::Malformed)?;
        if r.rtype != TYPE_OPT || b[pos] != 0 {
            return Err(QueryError::UnexpectedRecords);
        }
        if kf & QueryFlags::EDNS != 0 {
            return Err(QueryError::Malformed);
        }
        kf |= QueryFlags::EDNS;
        if u32_at(b, r.ttl_at) & EDNS_DO != 0 {
            kf |= QueryFlags::DO;
        }
        payload = u16_at(b, r.ttl_at - 2).max(512);
        (padded, walked) = padding(&b[r.rdata_at..r.end]);
        pos = r.end;
    }
    if pos != b.len() {
        return Err(QueryError::TrailingBytes);
    }
    if !walked {
        let mut decoder = BinDecoder::new(b);
        if Message::read(&mut decoder).is_err() || !decoder.is_empty() {
            return Err(QueryError::Malformed);
        }
    }
    let question = &b[HEADER_LEN..q_end];
    let mut lower: Box<[u8]> = question.into();
    lower[..name_end - HEADER_LEN].make_ascii_lowercase();
    Ok(Query {
        id: u16_at(b, 0),
        question,
        key: Key::from_parts(lower, QueryFlags(kf)),
        payload,
        padded,
    })
}

/// What the options of an OPT record's RDATA say of padding, in one walk:
/// whether a padding option is among them, and whether they are nothing
/// but whole padding options (or none at all).
fn padding(mut rdata: &[u8]) -> (bool, bool) {
    let (mut padded, mut only) = (false, true);
    while rdata.len() >= 4 {
        if u16::from_be_bytes([rdata[0], rdata[1]]) == OPTION_PADDING {
            padded = true;
        } else {
            only = false;
        }
        let len = usize::from(u16::from_be_bytes([rdata[2], rdata[3]]));
        match rdata.get(4 + len..) {
            Some(rest) => rdata = rest,
            None => return (padded, false),
        }
    }
    (padded, only && rdata.is_empty())
}

/// Builds the query sent upstream for `key`, with a fresh `id`.
pub fn upstream_query(id: u16, key: &Key) -> Vec<u8> {
    let mut q = Vec::with_capacity(HEADER_LEN + key.question().len() + 11);
    let f = key.flags().0;
    let mut flags = 0u16;
    if f & QueryFlags::RD != 0 {
        flags |= FLAG_RD;
    }
    if f & QueryFlags::CD != 0 {
        flags |= FLAG_CD;
    }
    if f & QueryFlags::AD != 0 {
        flags |= FLAG_AD;
    }
    let edns = f & QueryFlags::EDNS != 0;
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&flags.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, edns as u8]);
    q.extend_from_slice(key.question());
    if edns {
        push_opt(&mut q, f & QueryFlags::DO != 0);
    }
    q
}

fn push_opt(q: &mut Vec<u8>, dnssec_ok: bool) {
    q.push(0);
    q.extend_from_slice(&TYPE_OPT.to_be_bytes());
    q.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
    let ttl: u32 = if dnssec_ok { EDNS_DO } else { 0 };
    q.extend_from_slice(&ttl.to_be_bytes());
    q.extend_from_slice(&[0, 0]);
}

/// A SERVFAIL answer for `key`, as if the upstream had sent it.
pub fn servfail(key: &Key) -> Vec<u8> {
    let mut a = upstream_query(0, key);
    let flags = u16_at(&a, 2) | FLAG_QR | FLAG_RA | RCODE_SERVFAIL as u16;
    a[2..4].copy_from_slice(&flags.to_be_bytes());
    a
}

/// Each of `seeds` mutated `per` times (one to three bytes flipped,
/// replaced or inserted, or the message cut short), never within its
/// first `keep` bytes: for the tests that hold a walk to hickory's
/// verdict.
#[cfg(test)]
pub(crate) fn mutations(seeds: &[Vec<u8>], per: usize, keep: usize, mut each: impl FnMut(&[u8])) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in seeds {
        for _ in 0..per {
            let mut m = seed.clone();
            for _ in 0..1 + rnd() % 3 {
                let at = keep + (rnd() as usize) % (m.len() - keep);
                match rnd() % 4 {
                    0 => m[at] ^= 1 << (rnd() % 8),
                    1 => m[at] = rnd() as u8,
                    2 => m.truncate(at.max(keep + 1)),
                    _ => m.insert(at, rnd() as u8),
                }
            }
            each(&m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `www.Example.test. A` with an OPT record (DO set), as a stub would
    /// send it.
    pub fn sample_query(id: u16) -> Vec<u8> {
        let mut q = query_message("www.Example.test.", 1, id, true).unwrap();
        let n = q.len();
        q[n - 4] |= 0x80; // the DO bit, in the OPT record's TTL
        q
    }

    #[test]
    fn valid_query_keeps_case_and_normalises_key() {
        let w = sample_query(0xBEEF);
        let q = parse_query(&w).unwrap();
        assert_eq!(q.id, 0xBEEF);
        assert_eq!(&q.question[..9], b"\x03www\x07Exam");
        assert_eq!(&q.key.question()[..9], b"\x03www\x07exam");
        assert!(q.key.flags().edns() && q.key.flags().dnssec_ok() && q.key.flags().rd());
        assert_eq!(q.key.name(), "www.example.test.");
        assert_eq!(q.key.qtype(), 1);
    }

    #[test]
    fn each_malformation_has_its_reason() {
        let good = sample_query(1);
        let mut v = good.clone();
        v.push(0);
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::TrailingBytes);
        assert_eq!(parse_query(&good[..10]).unwrap_err(), QueryError::TooShort);
        let mut v = good.clone();
        v[2] |= 0x80;
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::NotAQuery);
        let mut v = good.clone();
        v[2] |= 0x28; // opcode 5 (UPDATE)
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::Opcode);
        let mut v = good.clone();
        v[5] = 2;
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::QuestionCount);
        let mut v = good.clone();
        v[5] = 0;
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::QuestionCount);
        let mut v = good.clone();
        v[7] = 1;
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::UnexpectedRecords);
        let mut v = good.clone();
        v[12] = 0xC0; // compression pointer in the question
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::BadName);
        let mut v = good.clone();
        v.truncate(v.len() - 1);
        assert_eq!(parse_query(&v).unwrap_err(), QueryError::Malformed);
    }

    /// What the query walk accepts on its own, hickory-proto accepts
    /// too: valid queries (with and without EDNS, padding, other options)
    /// and thousands of mutations of them, each byte flipped, truncated
    /// or extended.
    #[test]
    fn the_walk_accepts_nothing_hickory_rejects() {
        let mut seeds = vec![
            sample_query(1),
            query_message("a.example.", 28, 3, false).unwrap(),
        ];
        let key = parse_query(&sample_query(2)).unwrap().key;
        let padding = &[0, 12, 0, 3, 0, 0, 0][..];
        let cookie = &[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8][..];
        let subnet = &[0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2][..];
        for extra in [
            &[][..],
            padding,
            cookie,
            subnet,
            &[padding, padding].concat(),
        ] {
            let mut q = upstream_query(9, &key);
            let rdlen = q.len() - 2;
            q.extend_from_slice(extra);
            let n = u16_at(&q, rdlen) + extra.len() as u16;
            q[rdlen..rdlen + 2].copy_from_slice(&n.to_be_bytes());
            assert!(parse_query(&q).is_ok(), "{q:?}");
            seeds.push(q);
        }
        let mut accepted = 0;
        mutations(&seeds, 20_000, 0, |m| {
            if parse_query(m).is_ok() {
                accepted += 1;
                assert!(
                    Message::from_vec(m).is_ok(),
                    "accepted, hickory rejects: {m:?}"
                );
            }
        });
        assert!(
            accepted > 1000,
            "the mutations must reach the walk's paths ({accepted})"
        );
    }

    #[test]
    fn answer_must_match_id_and_question() {
        let key = parse_query(&sample_query(7)).unwrap().key;
        let mut a = upstream_query(0x1234, &key);
        a[2] |= 0x80;
        assert!(check_answer(&a, 0x1234, &key).is_ok());
        assert_eq!(check_answer(&a, 0x1235, &key).unwrap_err(), AnswerError::Id);
        let mut upper = a.clone();
        upper[13] = b'W'; // 0x20 from the upstream is fine
        assert!(check_answer(&upper, 0x1234, &key).is_ok());
        let mut other = a.clone();
        other[14] = b'x';
        assert_eq!(
            check_answer(&other, 0x1234, &key).unwrap_err(),
            AnswerError::Question
        );
        let mut typ = a.clone();
        let n = HEADER_LEN + key.question().len();
        typ[n - 3] = 28;
        assert_eq!(
            check_answer(&typ, 0x1234, &key).unwrap_err(),
            AnswerError::Question
        );
    }

    #[test]
    fn rewrite_sets_id_case_and_ttls() {
        let key = Key::new("a.test", 1, false).unwrap();
        let a = build::a_answer(&key, 5, 9);
        let info = check_answer(&a, 9, &key).unwrap();
        assert_eq!(info.ttl_offsets, vec![(a.len() - 10) as u16]);
        let client_q = b"\x01A\x04TeSt\x00\x00\x01\x00\x01";
        let (out, min) = rewrite_for_client(&a, &info.ttl_offsets, 0xAAAA, client_q, |t| t + 100);
        assert_eq!(&out[0..2], &[0xAA, 0xAA]);
        assert_eq!(&out[12..12 + client_q.len()], client_q);
        assert_eq!(min, Some(105));
        assert_eq!(read_ttl(&out, info.ttl_offsets[0] as usize), 105);
    }

    #[test]
    fn negative_ttl_from_soa() {
        use hickory_proto::op::ResponseCode;
        use hickory_proto::rr::rdata::SOA;
        use hickory_proto::rr::{Name, RData, Record};
        let key = Key::new("nx.test", 1, false).unwrap();
        let mut m = Message::from_vec(&upstream_query(3, &key)).unwrap();
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        m.metadata.response_code = ResponseCode::NXDomain;
        // test. SOA, TTL 3600, minimum 5
        let root = Name::root();
        let soa = SOA::new(root.clone(), root, 1, 2, 3, 4, 5);
        m.add_authority(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            3600,
            RData::SOA(soa),
        ));
        let a = m.to_vec().unwrap();
        let info = check_answer(&a, 3, &key).unwrap();
        assert!(info.is_negative());
        assert_eq!(info.negative_ttl, Some(5));
    }

    #[test]
    fn servfail_is_a_valid_answer() {
        let key = Key::new("a.test", 1, true).unwrap();
        let s = servfail(&key);
        let info = check_answer(&s, 0, &key).unwrap();
        assert_eq!(info.rcode, RCODE_SERVFAIL);
        assert!(info.ttl_offsets.is_empty());
    }
}
