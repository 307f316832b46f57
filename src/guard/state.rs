//! `--state-file`: the bans in force and the repeat counts, kept across
//! restarts so that abusers do not come straight back.
//!
//! Written atomically (a temporary file, then rename) when bans change, at
//! most once a second, and at shutdown; read once at start, dropping what
//! expired meanwhile. A file that cannot be read as ours (truncated,
//! corrupt, another program's) is reported, set aside as `PATH.bad`, and
//! never fatal.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::bans::{parse_target, SavedBan, SavedOffence};
use crate::reject::{ConnReject, ProtocolError, Reject};

const FORMAT: &str = "doh-proxy state";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    version: u32,
    /// Unix seconds.
    written: u64,
    bans: Vec<SavedBan>,
    offences: Vec<SavedOffence>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes the state atomically.
pub fn save(path: &Path, bans: Vec<SavedBan>, offences: Vec<SavedOffence>) -> std::io::Result<()> {
    let state = StateFile {
        format: FORMAT.into(),
        version: VERSION,
        written: unix_now(),
        bans,
        offences,
    };
    let text = serde_json::to_string_pretty(&state).map_err(std::io::Error::other)?;
    super::nft::write_atomically(path, &text)
}

/// What a state file held that is still in force.
#[derive(Debug, Default)]
pub struct Restored {
    /// (target, reason, since, remaining, hits)
    pub bans: Vec<(ipnet::IpNet, &'static str, SystemTime, Duration, u64)>,
    /// (target, count, remaining)
    pub offences: Vec<(ipnet::IpNet, u32, Duration)>,
    /// Entries dropped because they expired or did not parse.
    pub dropped: usize,
}

/// The label of a known reason, as a static string; `restored` otherwise.
pub fn static_reason(label: &str) -> &'static str {
    reason(label)
}

fn reason(label: &str) -> &'static str {
    Reject::ALL
        .iter()
        .map(|r| r.label())
        .chain(ConnReject::ALL.iter().map(|r| r.label()))
        .chain(ProtocolError::ALL.iter().map(|r| r.label()))
        .chain(["prefix", "manual"])
        .find(|l| *l == label)
        .unwrap_or("restored")
}

/// Reads a state file. `Ok(None)` when there is none yet; `Err` with a
/// one-line reason when it is not ours or is damaged (the file is then
/// moved to `PATH.bad`, so that it is not overwritten unread).
pub fn load(path: &Path) -> Result<Option<Restored>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the state file {}: {e}",
                path.display()
            ))
        }
    };
    let state: StateFile = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            return Err(set_aside(
                path,
                &format!("not a doh-proxy state file ({e})"),
            ))
        }
    };
    if state.format != FORMAT || state.version != VERSION {
        return Err(set_aside(
            path,
            &format!("format `{}` version {}", state.format, state.version),
        ));
    }
    let now = unix_now();
    let mut r = Restored::default();
    for b in state.bans {
        match parse_target(&b.target) {
            Some(net) if b.expires > now => r.bans.push((
                net,
                reason(&b.reason),
                UNIX_EPOCH + Duration::from_secs(b.since),
                Duration::from_secs(b.expires - now),
                b.hits,
            )),
            _ => r.dropped += 1,
        }
    }
    for o in state.offences {
        match parse_target(&o.target) {
            Some(net) if o.until > now => {
                r.offences
                    .push((net, o.count, Duration::from_secs(o.until - now)))
            }
            _ => r.dropped += 1,
        }
    }
    Ok(Some(r))
}

fn set_aside(path: &Path, why: &str) -> String {
    let mut bad = path.as_os_str().to_owned();
    bad.push(".bad");
    let bad = PathBuf::from(bad);
    match std::fs::rename(path, &bad) {
        Ok(()) => format!(
            "the state file {} is {why}: ignored, kept as {}",
            path.display(),
            bad.display()
        ),
        Err(e) => format!("the state file {} is {why}: ignored ({e})", path.display()),
    }
}

/// Whether `ip` is the shared key of unnamed clients.
pub fn is_unknown(ip: IpAddr) -> bool {
    ip == crate::net::UNKNOWN_CLIENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("doh-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn round_trip_drops_what_expired() {
        let p = temp("ok.json");
        let now = unix_now();
        let ban = |t: &str, expires: u64| SavedBan {
            target: t.into(),
            reason: "obsolete_draft".into(),
            since: now - 10,
            expires,
            hits: 3,
        };
        save(
            &p,
            vec![
                ban("192.0.2.1/32", now + 600),
                ban("198.51.100.0/24", now - 1),
                ban("unknown", now + 60),
            ],
            vec![SavedOffence {
                target: "192.0.2.1/32".into(),
                count: 2,
                until: now + 3600,
            }],
        )
        .unwrap();
        let r = load(&p).unwrap().unwrap();
        assert_eq!(r.bans.len(), 2);
        assert_eq!(r.dropped, 1);
        assert_eq!(r.bans[0].1, "obsolete_draft");
        assert!(r.bans[0].3 > Duration::from_secs(590));
        assert!(is_unknown(r.bans[1].0.addr()));
        assert_eq!(r.offences[0].1, 2);
    }

    #[test]
    fn a_damaged_file_is_set_aside_not_fatal() {
        let p = temp("bad.json");
        std::fs::write(&p, "{\"format\": \"doh-proxy state\", \"vers").unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.contains("not a doh-proxy state file"), "{e}");
        assert!(!p.exists());
        assert!(temp("bad.json.bad").exists());
        assert!(load(&temp("none.json")).unwrap().is_none());
        std::fs::write(
            &p,
            "{\"format\":\"other\",\"version\":1,\"written\":0,\"bans\":[],\"offences\":[]}",
        )
        .unwrap();
        assert!(load(&p).unwrap_err().contains("format `other`"));
    }
}
