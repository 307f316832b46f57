//! The upstream answer acceptance check: never panics, and what it accepts
//! answers our question with offsets that lie inside the message, and is
//! a message hickory-proto reads (records checked in place are held to
//! hickory's rules).
#![no_main]

use doh_proxy::dns::{self, Key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = Key::new(
        "www.example.test",
        1,
        data.first().is_some_and(|b| b & 1 == 1),
    )
    .expect("a valid name");
    let id = data
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    if let Ok(info) = dns::check_answer(data, id, &key) {
        assert_eq!(&data[..2], &id.to_be_bytes());
        for off in info.ttl_offsets {
            assert!(off as usize + 4 <= data.len());
        }
        assert!(hickory_proto::op::Message::from_vec(data).is_ok());
    }
});
