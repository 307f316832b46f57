//! A client request from its query string or POST body to the DNS
//! validation verdict: never panics, and a query that passes is one valid
//! message whose question is echoed exactly.
#![no_main]

use doh_proxy::doh::{self, Limits, Wanted};
use doh_proxy::{dns, reject::Reject};
use libfuzzer_sys::fuzz_target;

fn limits() -> Limits {
    Limits {
        path: "/dns-query".into(),
        max_uri: 4096,
        max_body: 65535,
        body_timeout: std::time::Duration::from_secs(1),
        odoh: true,
    }
}

fn verdict(msg: &[u8]) {
    if let Ok(q) = dns::parse_query(msg) {
        assert_eq!(q.question.len(), q.key.question().len());
        assert!(q.question.eq_ignore_ascii_case(q.key.question()));
        assert_eq!(&msg[12..12 + q.question.len()], q.question);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // GET: the rest is the query string.
        let Ok(qs) = std::str::from_utf8(rest) else {
            return;
        };
        let Ok(req) = http::Request::get(format!("/dns-query?{qs}")).body(()) else {
            return;
        };
        let (parts, ()) = req.into_parts();
        match doh::check_head(&parts, &limits()) {
            Ok(Wanted::Get(msg)) => verdict(&msg),
            Ok(Wanted::Post | Wanted::Oblivious) => unreachable!("a GET is never a POST"),
            Ok(Wanted::OdohConfigs) => unreachable!("not the configs' path"),
            Err(r) => assert_ne!(r.status(), 200u16, "{r:?}"),
        }
    } else {
        // POST: the rest is the body.
        let (parts, ()) = http::Request::post("/dns-query")
            .header("content-type", doh::DNS_MESSAGE)
            .body(())
            .unwrap()
            .into_parts();
        assert_eq!(doh::check_head(&parts, &limits()), Ok(Wanted::Post));
        verdict(rest);
        let _: Option<Reject> = dns::parse_query(rest).err().map(Reject::from);
    }
});
