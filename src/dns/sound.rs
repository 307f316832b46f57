//! Records checked in place: whether an upstream answer's records are
//! well formed without decoding them into hickory-proto's types.
//!
//! An accepted answer must be one hickory-proto reads (see the module
//! above). Decoding every record of every miss allocates names and record
//! lists, 4 % of what a miss costs; the records answers are nearly always
//! made of (A, AAAA, CNAME, NS, PTR, MX, SOA, TXT, an OPT without options)
//! are checked here instead, to the same rules hickory applies. What this
//! check does not vouch for is not refused here: the caller has hickory
//! decode the whole message, which decides. So this check only ever saves
//! work; it never accepts what hickory would refuse (a test and the
//! `answer` fuzz target hold it to that).

use super::{u16_at, RecordAt, TYPE_OPT, TYPE_SOA};

const TYPE_A: u16 = 1;
const TYPE_NS: u16 = 2;
const TYPE_CNAME: u16 = 5;
const TYPE_PTR: u16 = 12;
const TYPE_MX: u16 = 15;
const TYPE_TXT: u16 = 16;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Whether the record `r` starting at `pos`, in section `section` (0
/// answer, 1 authority, 2 additional), is well formed by hickory-proto's
/// rules and of a type checked here. `false` means "not vouched for", not
/// "malformed". `seen_opt` is whether an OPT record came before.
pub(super) fn vouched(b: &[u8], pos: usize, r: &RecordAt, section: usize, seen_opt: bool) -> bool {
    let (at, end) = (r.rdata_at, r.end);
    // walk_record found a type, class, TTL and length after the owner.
    if name_end(b, pos) != Some(at - 10) {
        return false;
    }
    if r.rtype == TYPE_OPT {
        // One OPT, in the additional section, owned by the root, without
        // options (hickory parses options it knows).
        return section == 2 && !seen_opt && b[pos] == 0 && at == end;
    }
    if u16_at(b, at - 8) != CLASS_IN {
        return false;
    }
    match r.rtype {
        TYPE_A => end - at == 4,
        TYPE_AAAA => end - at == 16,
        TYPE_NS | TYPE_CNAME | TYPE_PTR => name_end(b, at) == Some(end),
        TYPE_MX => end - at > 2 && name_end(b, at + 2) == Some(end),
        TYPE_SOA => name_end(b, at)
            .and_then(|rname| name_end(b, rname))
            .is_some_and(|fixed| fixed + 20 == end),
        TYPE_TXT => end > at && strings_fill(&b[at..end]),
        _ => false,
    }
}

/// Where the name at `at` ends in place, if it is well formed: labels of
/// at most 63 bytes, at most 255 bytes in all once pointers are followed,
/// and every compression pointer pointing before the part of the name it
/// continues, whose labels stay before the part that pointed to them.
fn name_end(b: &[u8], at: usize) -> Option<usize> {
    // Where this part of the name began, and where the part that pointed
    // here began (labels read here must start before it).
    let (mut start, mut limit) = (at, usize::MAX);
    let (mut p, mut len, mut end) = (at, 1usize, None);
    for _ in 0..128 {
        if p >= limit {
            return None;
        }
        let l = usize::from(*b.get(p)?);
        match l & 0xC0 {
            0 if l == 0 => return end.or(Some(p + 1)),
            0 => {
                len += 1 + l;
                if len > 255 || p + 1 + l >= b.len() {
                    return None;
                }
                p += 1 + l;
            }
            0xC0 => {
                if p + 2 > b.len() {
                    return None;
                }
                let target = usize::from(u16_at(b, p) & 0x3FFF);
                if target >= start {
                    return None;
                }
                end.get_or_insert(p + 2);
                (limit, start, p) = (start, target, target);
            }
            _ => return None,
        }
    }
    None
}

/// Whether `rdata` is character strings (a length, then that many
/// bytes) exactly.
fn strings_fill(mut rdata: &[u8]) -> bool {
    while let Some((&l, rest)) = rdata.split_first() {
        match rest.get(usize::from(l)..) {
            Some(after) => rdata = after,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{check_answer, parse_query, upstream_query, walk_record, Key, HEADER_LEN};
    use hickory_proto::op::{Edns, Message, MessageType};
    use hickory_proto::rr::rdata::{CNAME, MX, NS, SOA, TXT};
    use hickory_proto::rr::{Name, RData, Record};

    fn key() -> Key {
        let q = crate::dns::query_message("www.example.test", 1, 1, true).unwrap();
        parse_query(&q).unwrap().key
    }

    /// Answers of every type checked here, compressed as hickory writes
    /// them, and a few it does not vouch for.
    fn answers(key: &Key) -> Vec<Vec<u8>> {
        let q = upstream_query(7, key);
        let base = Message::from_vec(&q).unwrap();
        let name = base.queries[0].name().clone();
        let zone = Name::from_ascii("example.test.").unwrap();
        let soa = RData::SOA(SOA::new(
            zone.clone(),
            Name::from_ascii("hostmaster.example.test.").unwrap(),
            1,
            2,
            3,
            4,
            5,
        ));
        let sets: Vec<Vec<(usize, RData)>> = vec![
            vec![(0, RData::A("192.0.2.1".parse().unwrap()))],
            vec![(0, RData::AAAA("2001:db8::1".parse().unwrap()))],
            vec![
                (0, RData::CNAME(CNAME(zone.clone()))),
                (0, RData::A("192.0.2.2".parse().unwrap())),
            ],
            vec![(0, RData::MX(MX::new(10, zone.clone())))],
            vec![(
                0,
                RData::TXT(TXT::new(vec!["v=spf1".into(), String::new()])),
            )],
            vec![(1, soa.clone())],
            vec![
                (1, RData::NS(NS(zone.clone()))),
                (2, RData::A("192.0.2.3".parse().unwrap())),
            ],
            vec![
                (1, soa),
                (0, RData::PTR(hickory_proto::rr::rdata::PTR(zone))),
            ],
            // Not vouched for: hickory decides.
            vec![(
                0,
                RData::CAA(hickory_proto::rr::rdata::CAA::new_issue(
                    false,
                    None,
                    vec![],
                )),
            )],
        ];
        let mut out = Vec::new();
        for set in sets {
            for edns in [false, true] {
                let mut m = base.clone();
                m.metadata.message_type = MessageType::Response;
                for (section, data) in &set {
                    let r = Record::from_rdata(name.clone(), 300, data.clone());
                    match section {
                        0 => m.add_answer(r),
                        1 => m.add_authority(r),
                        _ => m.add_additional(r),
                    };
                }
                if edns {
                    m.set_edns(Edns::new());
                } else {
                    m.edns = None;
                }
                out.push(m.to_vec().unwrap());
            }
        }
        out
    }

    /// Whether every record of `b` is vouched for (`None` when `b` does
    /// not even walk).
    fn all_vouched(b: &[u8]) -> Option<bool> {
        let q = crate::dns::question_len(b)?;
        let mut pos = HEADER_LEN + q;
        let (mut all, mut seen_opt) = (true, false);
        for section in 0..3 {
            for _ in 0..u16_at(b, 6 + 2 * section) {
                let r = walk_record(b, pos)?;
                all &= vouched(b, pos, &r, section, seen_opt);
                seen_opt |= r.rtype == TYPE_OPT;
                pos = r.end;
            }
        }
        Some(all && pos == b.len())
    }

    #[test]
    fn the_usual_answers_are_vouched_for() {
        let key = key();
        let all = answers(&key);
        let vouched = all.iter().filter(|a| all_vouched(a) == Some(true)).count();
        assert_eq!(vouched, all.len() - 2, "all but the CAA answers");
        for a in &all {
            assert!(check_answer(a, 7, &key).is_ok(), "{a:?}");
        }
    }

    #[test]
    fn names_follow_hickorys_rules() {
        // Header, then "a" at 12, then a pointer to it at 15.
        let mut b = vec![0u8; 12];
        b.extend_from_slice(&[1, b'a', 0, 0xC0, 12]);
        assert_eq!(name_end(&b, 12), Some(15));
        assert_eq!(name_end(&b, 15), Some(17));
        // A pointer to itself, or forward.
        b.extend_from_slice(&[0xC0, 17, 0xC0, 22]);
        assert_eq!(name_end(&b, 17), None);
        assert_eq!(name_end(&b, 19), None);
        // A pointer forward, to a well-formed name.
        let mut v = vec![0u8; 12];
        v.extend_from_slice(&[0xC0, 14, 1, b'a', 0]);
        assert_eq!((name_end(&v, 12), name_end(&v, 14)), (None, Some(17)));
        // A name at 16 points back to 12, whose second label runs over
        // the pointer itself: labels overlapping the name that points to
        // them (well formed when read from 12).
        let mut v = vec![0u8; 12];
        v.extend_from_slice(&[1, b'x', 3, b'y', 0xC0, 12, 0]);
        assert_eq!((name_end(&v, 16), name_end(&v, 12)), (None, Some(19)));
        // Labels of 64 bytes and the 0x40 and 0x80 kinds.
        for first in [64u8, 0x40 | 3, 0x80 | 3] {
            let mut v = vec![0u8; 12];
            v.push(first);
            v.extend_from_slice(&[b'x'; 64]);
            v.push(0);
            assert_eq!(name_end(&v, 12), None, "{first}");
        }
        // 256 bytes in all through a pointer.
        let mut v = vec![0u8; 12];
        for _ in 0..4 {
            v.push(63);
            v.extend_from_slice(&[b'x'; 63]);
        }
        v.push(0);
        assert_eq!(name_end(&v, 12), None);
        assert!(strings_fill(&[0, 2, b'a', b'b']) && !strings_fill(&[3, b'a']));
    }

    /// What is vouched for here hickory-proto reads too: the answers above
    /// and hundreds of thousands of mutations of them.
    #[test]
    fn nothing_vouched_for_is_what_hickory_rejects() {
        let key = key();
        let seeds = answers(&key);
        let mut vouched = 0;
        crate::dns::mutations(&seeds, 20_000, HEADER_LEN, |m| {
            if all_vouched(m) == Some(true) {
                vouched += 1;
                assert!(
                    Message::from_vec(m).is_ok(),
                    "vouched for, hickory rejects: {m:?}"
                );
            }
        });
        assert!(
            vouched > 10_000,
            "the mutations must reach the paths ({vouched})"
        );
    }
}
