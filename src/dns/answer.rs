//! Upstream answers: what is accepted, what reaches a client, and the
//! copy a client gets of a cached answer.

use hickory_proto::op::Message;

use super::{
    skip_name, u16_at, u32_at, walk_record, Key, FLAG_QR, FLAG_TC, HEADER_LEN, RCODE_NOERROR,
    RCODE_NXDOMAIN, TYPE_OPT, TYPE_SOA,
};

pub const TYPE_RRSIG: u16 = 46;
pub const TYPE_NSEC: u16 = 47;
pub const TYPE_NSEC3: u16 = 50;

/// Why an upstream answer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("answer ID does not match")]
    Id,
    #[error("not a response to our question")]
    Question,
    #[error("malformed answer")]
    Malformed,
}

/// What the cache needs to know of an accepted upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerInfo {
    pub rcode: u8,
    pub truncated: bool,
    pub answers: u16,
    /// Offsets of the TTL of every record but OPT.
    pub ttl_offsets: Vec<u16>,
    /// RFC 2308 negative TTL: min(SOA TTL, SOA MINIMUM) of an authority SOA.
    pub negative_ttl: Option<u32>,
}

impl AnswerInfo {
    /// NXDOMAIN, or NOERROR with no answer records (NODATA).
    pub fn is_negative(&self) -> bool {
        self.rcode == RCODE_NXDOMAIN || (self.rcode == RCODE_NOERROR && self.answers == 0)
    }
}

/// Checks that `b` answers exactly our query `id` for `key`, and locates
/// its TTLs. Anything else (a spoof, a late answer, garbage) is an error and
/// must be dropped.
pub fn check_answer(b: &[u8], id: u16, key: &Key) -> Result<AnswerInfo, AnswerError> {
    if b.len() < HEADER_LEN {
        return Err(AnswerError::Malformed);
    }
    if u16_at(b, 0) != id {
        return Err(AnswerError::Id);
    }
    let flags = u16_at(b, 2);
    if flags & FLAG_QR == 0 || (flags >> 11) & 0xF != 0 || u16_at(b, 4) != 1 {
        return Err(AnswerError::Question);
    }
    let q = key.question();
    let q_end = HEADER_LEN + q.len();
    let Some(theirs) = b.get(HEADER_LEN..q_end) else {
        return Err(AnswerError::Question);
    };
    let name_len = q.len() - 4;
    if !theirs[..name_len].eq_ignore_ascii_case(&q[..name_len])
        || theirs[name_len..] != q[name_len..]
    {
        return Err(AnswerError::Question);
    }
    let counts = [u16_at(b, 6), u16_at(b, 8), u16_at(b, 10)];
    let mut info = AnswerInfo {
        rcode: (flags & 0xF) as u8,
        truncated: flags & FLAG_TC != 0,
        answers: counts[0],
        ttl_offsets: Vec::new(),
        negative_ttl: None,
    };
    let mut pos = q_end;
    // Whether every record is of a kind checked in place to hickory's
    // rules; if not, hickory decodes the message and decides.
    let (mut vouched, mut seen_opt) = (true, false);
    for (section, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            let r = walk_record(b, pos).ok_or(AnswerError::Malformed)?;
            vouched = vouched && super::sound::vouched(b, pos, &r, section, seen_opt);
            seen_opt |= r.rtype == TYPE_OPT;
            if r.rtype != TYPE_OPT {
                info.ttl_offsets
                    .push(u16::try_from(r.ttl_at).map_err(|_| AnswerError::Malformed)?);
            }
            if section == 1 && r.rtype == TYPE_SOA && r.end >= r.rdata_at + 22 {
                let ttl = u32_at(b, r.ttl_at);
                let minimum = u32_at(b, r.end - 4);
                info.negative_ttl = Some(ttl.min(minimum));
            }
            pos = r.end;
        }
    }
    if pos != b.len() || (!vouched && Message::from_vec(b).is_err()) {
        return Err(AnswerError::Malformed);
    }
    Ok(info)
}

/// TTLs are stored as sent on the wire: 32 bits, but RFC 2181 says values
/// with the top bit set mean zero.
pub fn read_ttl(b: &[u8], at: usize) -> u32 {
    let t = u32_at(b, at);
    if t & 0x8000_0000 != 0 {
        0
    } else {
        t
    }
}

pub fn write_ttl(b: &mut [u8], at: usize, ttl: u32) {
    b[at..at + 4].copy_from_slice(&ttl.to_be_bytes());
}

/// Copies a stored answer for one client: its ID, its own question bytes
/// (so 0x20 case comes back as sent), and every TTL mapped by `ttl`.
/// Returns the message and the smallest TTL served (None without records).
pub fn rewrite_for_client(
    stored: &[u8],
    ttl_offsets: &[u16],
    id: u16,
    question: &[u8],
    mut ttl: impl FnMut(u32) -> u32,
) -> (Vec<u8>, Option<u32>) {
    let mut out = stored.to_vec();
    out[0..2].copy_from_slice(&id.to_be_bytes());
    if let Some(q) = out.get_mut(HEADER_LEN..HEADER_LEN + question.len()) {
        q.copy_from_slice(question);
    }
    let mut min: Option<u32> = None;
    for &off in ttl_offsets {
        let at = off as usize;
        let served = ttl(read_ttl(stored, at));
        write_ttl(&mut out, at, served);
        min = Some(min.map_or(served, |m| m.min(served)));
    }
    (out, min)
}

/// The response code of a message (low four bits).
pub fn rcode(b: &[u8]) -> u8 {
    b.get(3).map_or(0, |f| f & 0xF)
}

/// Reads a possibly compressed name at `pos` into its uncompressed wire
/// form; returns it and the offset after the name where it started.
/// Bounded: at most 128 pointers and 255 bytes.
fn read_name(b: &[u8], pos: usize) -> Option<(Vec<u8>, usize)> {
    let end = skip_name(b, pos)?;
    let mut out = Vec::with_capacity(32);
    let mut at = pos;
    for _ in 0..128 {
        let len = *b.get(at)? as usize;
        match len & 0xC0 {
            0x00 if len == 0 => {
                out.push(0);
                return (out.len() <= 255).then_some((out, end));
            }
            0x00 => {
                out.extend_from_slice(b.get(at..at + 1 + len)?);
                if out.len() > 255 {
                    return None;
                }
                at += 1 + len;
            }
            0xC0 => {
                let target = usize::from(u16_at(b, at)) & 0x3FFF;
                if target >= at {
                    return None; // pointers only go back
                }
                at = target;
            }
            _ => return None,
        }
    }
    None
}

/// Removes from an accepted answer what a client must not get: every
/// additional record but OPT (glue, out-of-bailiwick data), and every
/// authority record unless the answer is negative, where only the SOA
/// and, when the client set DO, the NSEC, NSEC3 and RRSIG records proving
/// the denial stay. Returns `None` when there is nothing to remove.
///
/// The header, question and answer section are copied as they are (a
/// compression pointer only points back, so they hold together); kept
/// authority records are written with their names uncompressed, since
/// what they pointed into may be gone.
pub fn strip_extras(b: &[u8], dnssec_ok: bool) -> Option<Vec<u8>> {
    if b.len() < HEADER_LEN {
        return None;
    }
    let flags = u16_at(b, 2);
    let rcode = (flags & 0xF) as u8;
    let counts = [u16_at(b, 6), u16_at(b, 8), u16_at(b, 10)];
    let negative = rcode == RCODE_NXDOMAIN || (rcode == RCODE_NOERROR && counts[0] == 0);
    let mut pos = HEADER_LEN + super::question_len(b)?;
    for _ in 0..counts[0] {
        pos = walk_record(b, pos)?.end;
    }
    let answers_end = pos;
    let mut authority = Vec::new();
    let mut dropped = false;
    for _ in 0..counts[1] {
        let r = walk_record(b, pos)?;
        let keep = negative
            && (r.rtype == TYPE_SOA
                || (dnssec_ok && matches!(r.rtype, TYPE_NSEC | TYPE_NSEC3 | TYPE_RRSIG)));
        if keep {
            authority.push((pos, r.rtype, r.ttl_at, r.rdata_at, r.end));
        } else {
            dropped = true;
        }
        pos = r.end;
    }
    let mut opt = None;
    for _ in 0..counts[2] {
        let r = walk_record(b, pos)?;
        if r.rtype == TYPE_OPT && b[pos] == 0 && opt.is_none() {
            opt = Some(pos..r.end);
        } else {
            dropped = true;
        }
        pos = r.end;
    }
    if !dropped {
        return None;
    }
    let mut out = b[..answers_end].to_vec();
    for &(start, rtype, ttl_at, rdata_at, end) in &authority {
        let (owner, _) = read_name(b, start)?;
        out.extend_from_slice(&owner);
        // type, class, TTL
        out.extend_from_slice(&b[ttl_at - 4..ttl_at + 4]);
        if rtype == TYPE_SOA {
            let (mname, after) = read_name(b, rdata_at)?;
            let (rname, after) = read_name(b, after)?;
            let fixed = b.get(after..after + 20)?;
            if after + 20 != end {
                return None;
            }
            let rdlen = u16::try_from(mname.len() + rname.len() + 20).ok()?;
            out.extend_from_slice(&rdlen.to_be_bytes());
            out.extend_from_slice(&mname);
            out.extend_from_slice(&rname);
            out.extend_from_slice(fixed);
        } else {
            // NSEC, NSEC3 and RRSIG names are never compressed (RFC 4034).
            out.extend_from_slice(&b[ttl_at + 4..end]);
        }
    }
    if let Some(r) = &opt {
        out.extend_from_slice(&b[r.clone()]);
    }
    let ns = u16::try_from(authority.len()).ok()?;
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    out[10..12].copy_from_slice(&u16::from(opt.is_some()).to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod padding_tests {
    use super::*;

    fn answer_with_edns() -> Vec<u8> {
        let key = Key::new("pad.test", 1, true).unwrap();
        crate::dns::build::a_answer(&key, 60, 1)
    }

    #[test]
    fn pads_to_the_block_within_the_limit() {
        let mut a = answer_with_edns();
        let before = a.len();
        assert!(pad(&mut a, 4096) > 0);
        assert_eq!(a.len(), PADDING_BLOCK);
        let m = Message::from_vec(&a).unwrap();
        assert!(m.edns.is_some(), "still a valid message with its OPT");
        // A limit under one block: no padding at all.
        let mut b = answer_with_edns();
        assert_eq!(pad(&mut b, 400), 0);
        assert_eq!(b.len(), before);
        // A long answer and a limit of 512: nothing fits, nothing added.
        let mut c = answer_with_edns();
        c.resize(c.len(), 0);
        assert!(pad(&mut c, 512) > 0 && c.len() == PADDING_BLOCK);
    }

    #[test]
    fn a_longer_answer_takes_the_next_block_if_it_fits() {
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{RData, Record};
        let key = Key::new("pad.test", 1, true).unwrap();
        let mut m = Message::from_vec(&crate::dns::build::a_answer(&key, 60, 1)).unwrap();
        let name = m.queries[0].name().clone();
        for i in 0..40 {
            m.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::A(A::new(192, 0, 2, i)),
            ));
        }
        let big = m.to_vec().unwrap();
        assert!(big.len() > PADDING_BLOCK && big.len() + 4 < 2 * PADDING_BLOCK);
        let mut a = big.clone();
        assert_eq!(
            pad(&mut a, 2 * PADDING_BLOCK - 1),
            0,
            "936 does not fit in 935"
        );
        assert_eq!(a, big);
        let mut b = big.clone();
        assert!(pad(&mut b, 4096) > 0);
        assert_eq!(b.len(), 2 * PADDING_BLOCK);
    }

    #[test]
    fn options_are_cleared() {
        let mut a = answer_with_edns();
        pad(&mut a, 4096);
        clear_options(&mut a);
        let m = Message::from_vec(&a).unwrap();
        assert!(m.edns.unwrap().options().as_ref().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, NS, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// An answer to `q.test. A` from a server that adds everything it can.
    fn chatty(rcode: ResponseCode, with_answer: bool) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(Query::query(name("q.test."), RecordType::A));
        if with_answer {
            m.add_answer(Record::from_rdata(
                name("q.test."),
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        m.add_authority(Record::from_rdata(
            name("test."),
            86400,
            RData::NS(NS(name("ns.elsewhere.example."))),
        ));
        m.add_authority(Record::from_rdata(
            name("test."),
            3600,
            RData::SOA(SOA::new(
                name("ns.test."),
                name("hostmaster.test."),
                1,
                2,
                3,
                4,
                5,
            )),
        ));
        m.add_additional(Record::from_rdata(
            name("ns.elsewhere.example."),
            86400,
            RData::A(A::new(203, 0, 113, 66)),
        ));
        m.set_edns(Edns::new());
        m.to_vec().unwrap()
    }

    #[test]
    fn positive_answers_keep_only_answers_and_opt() {
        let key = Key::new("q.test", 1, true).unwrap();
        let wire = chatty(ResponseCode::NoError, true);
        let out = strip_extras(&wire, false).expect("something to strip");
        let info = check_answer(&out, 7, &key).unwrap();
        assert_eq!(info.ttl_offsets.len(), 1, "only the answer's TTL");
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.answers.len(), 1);
        assert!(m.authorities.is_empty() && m.additionals.is_empty());
        assert!(m.edns.is_some(), "OPT stays");
        assert_eq!(strip_extras(&out, false), None, "nothing more to strip");
    }

    #[test]
    fn negative_answers_keep_their_soa() {
        let key = Key::new("q.test", 1, true).unwrap();
        let wire = chatty(ResponseCode::NXDomain, false);
        let out = strip_extras(&wire, true).expect("something to strip");
        let info = check_answer(&out, 7, &key).unwrap();
        assert_eq!(info.negative_ttl, Some(5));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(
            m.authorities[0].data.to_string(),
            "ns.test. hostmaster.test. 1 2 3 4 5"
        );
        assert!(m.additionals.is_empty());
    }
}

/// Block size of answer padding (RFC 8467 §4.1).
pub const PADDING_BLOCK: usize = 468;

/// Where the OPT record is, when it is the last record of the message:
/// (offset of its RDLENGTH, offset of its RDATA).
fn last_opt(b: &[u8]) -> Option<(usize, usize)> {
    let counts = [u16_at(b, 6), u16_at(b, 8), u16_at(b, 10)];
    let mut pos = HEADER_LEN + super::question_len(b)?;
    let mut last = None;
    for &count in &counts {
        for _ in 0..count {
            let r = walk_record(b, pos)?;
            last = Some((r.rtype, r.rdata_at, r.end));
            pos = r.end;
        }
    }
    match last {
        Some((TYPE_OPT, rdata_at, end)) if end == b.len() && pos == b.len() => {
            Some((rdata_at - 2, rdata_at))
        }
        _ => None,
    }
}

/// Drops every option of the answer's OPT record (the upstream's cookies,
/// NSID, padding are not the client's business); the record stays.
pub fn clear_options(b: &mut Vec<u8>) {
    if let Some((rdlen_at, rdata_at)) = last_opt(b) {
        b.truncate(rdata_at);
        b[rdlen_at..rdlen_at + 2].copy_from_slice(&0u16.to_be_bytes());
    }
}

/// Pads an answer with an EDNS(0) Padding option (RFC 7830) to a multiple
/// of [`PADDING_BLOCK`] bytes, never beyond `limit` (then the largest
/// multiple that fits, or nothing). Needs an OPT record as the last record
/// (any answer to an EDNS query has one). Returns the padding bytes added.
pub fn pad(b: &mut Vec<u8>, limit: usize) -> usize {
    let Some((rdlen_at, _)) = last_opt(b) else {
        return 0;
    };
    let with_option = b.len() + 4;
    let mut target = with_option.div_ceil(PADDING_BLOCK) * PADDING_BLOCK;
    while target > limit && target >= with_option + PADDING_BLOCK {
        target -= PADDING_BLOCK;
    }
    if target > limit || target < with_option {
        return 0;
    }
    let zeros = target - with_option;
    let rdlen = usize::from(u16_at(b, rdlen_at)) + 4 + zeros;
    let Ok(rdlen) = u16::try_from(rdlen) else {
        return 0;
    };
    b[rdlen_at..rdlen_at + 2].copy_from_slice(&rdlen.to_be_bytes());
    b.extend_from_slice(&super::OPTION_PADDING.to_be_bytes());
    b.extend_from_slice(&(zeros as u16).to_be_bytes());
    b.resize(target, 0);
    zeros + 4
}
