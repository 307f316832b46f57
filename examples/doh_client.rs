//! A small DoH client: one query over HTTPS (HTTP/2, GET), the answer
//! printed like dig's short form.
//!
//!     cargo run --example doh_client -- https://127.0.0.1:8443/dns-query example.test A --insecure
//!     cargo run --example doh_client -- https://127.0.0.1:8443/dns-query example.test AAAA --ca ca.pem

#[path = "common/mod.rs"]
mod common;

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), common::Error> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let usage = "usage: doh_client URL NAME [TYPE] [--ca PEM | --insecure]";
    let url: http::Uri = args.first().ok_or(usage)?.parse()?;
    let name = args.get(1).ok_or(usage)?;
    let qtype: RecordType = args.get(2).map_or("A", |s| s.as_str()).parse()?;
    let ca = common::arg("--ca", "");
    let tls = common::tls(
        (!common::flag("--insecure"))
            .then_some(ca.as_str())
            .filter(|c| !c.is_empty()),
    )?;
    let host = url.host().ok_or("URL needs a host")?;
    let port = url.port_u16().unwrap_or(443);
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await?
        .next()
        .ok_or("no address for the URL's host")?;
    let mut conn = common::connect(&tls, addr, None).await?;
    let path = common::dns_path(url.path(), name, u16::from(qtype));
    let (status, body) = common::get(&mut conn, &path, &[]).await?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)).into());
    }
    let msg = Message::from_vec(&body)?;
    println!(";; {} from {url}", msg.metadata.response_code);
    for r in msg.answers.iter().chain(&msg.authorities) {
        println!("{}\t{}\t{}\t{}", r.name, r.ttl, r.record_type(), r.data);
    }
    Ok(())
}
