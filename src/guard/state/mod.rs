//! `--state-file`: the bans in force and the repeat counts, kept across
//! restarts so that abusers do not come straight back.
//!
//! Writing costs what changed, not what is kept: each second the changes
//! (a ban, a lift, a repeat count) are appended to `PATH.journal`, one JSON
//! line each; now and then — when the journal holds more lines than there
//! are bans — it is folded into the snapshot `PATH` in a background thread
//! that reads the files, not the ban table, so no lock is held: the
//! journal is first renamed `PATH.journal.old` (new changes go to a new
//! journal), then snapshot and old journal are merged into a new snapshot
//! written atomically (a temporary file, then rename), then the old
//! journal is removed. Each journal line says what is ("this ban until
//! then", "no ban on that"), so replaying a line twice — after a crash in
//! the middle of a merge — changes nothing. At shutdown, and when more
//! changes came than the journal keeps, a whole snapshot is written. Read
//! once at start: snapshot, old journal, journal, dropping what expired
//! meanwhile. The file is untrusted input: anybody who can write
//! it (or a disk that damaged it) must not be able to stop the proxy from
//! starting, nor ban more than the ban rules ever could. So every number is
//! range-checked before any time arithmetic ([`Limits`]): a time past
//! [`HORIZON`], a ban wider than the configured prefixes, a target that does
//! not parse drops its entry with a warning. A file that cannot be read as
//! ours (truncated, corrupt, another program's), or that held such entries,
//! is reported and set aside as `PATH.bad`; never fatal.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::bans::{parse_target, Change, SavedBan, SavedOffence};
use crate::clock::unix_now;
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

/// How far in the future any time in the file may lie: no ban the proxy
/// makes lasts longer ([`super::bans::MAX_BAN`]).
pub const HORIZON: Duration = super::bans::MAX_BAN;
/// Earliest plausible `since`: 2000-01-01.
const EPOCH_FLOOR: u64 = 946_684_800;

/// What the ban rules allow, for checking entries read back.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Widest IPv4 ban: `--prefix-v4`.
    pub prefix_v4: u8,
    /// Widest IPv6 ban: `--prefix-v6`.
    pub prefix_v6: u8,
}

/// Writes the whole state atomically, and removes the journals it makes
/// redundant.
pub fn save(path: &Path, bans: Vec<SavedBan>, offences: Vec<SavedOffence>) -> std::io::Result<()> {
    let _one = SNAPSHOT.lock().unwrap_or_else(|p| p.into_inner());
    write_snapshot(path, bans, offences)?;
    clear_journals(path);
    Ok(())
}

/// Snapshot writes one at a time: a merge that read the old snapshot must
/// not overwrite a whole state saved meanwhile.
static SNAPSHOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn write_snapshot(
    path: &Path,
    bans: Vec<SavedBan>,
    offences: Vec<SavedOffence>,
) -> std::io::Result<()> {
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
    /// Entries dropped because they expired.
    pub dropped: usize,
    /// Entries dropped as out of range or unparseable, each with why.
    pub invalid: Vec<String>,
    /// Where the file went, when it held invalid entries.
    pub set_aside: Option<String>,
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

/// `PATH` with `suffix` added.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The journal changes are appended to.
pub fn journal_path(path: &Path) -> PathBuf {
    beside(path, ".journal")
}

fn old_journal_path(path: &Path) -> PathBuf {
    beside(path, ".journal.old")
}

/// Appends `changes` to the journal: time in proportion to the changes.
pub fn append(path: &Path, changes: &[Change]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut text = Vec::with_capacity(changes.len() * 128);
    for c in changes {
        serde_json::to_writer(&mut text, c).map_err(std::io::Error::other)?;
        text.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal_path(path))?;
    f.write_all(&text)
}

/// Starts a merge: the journal becomes the old journal, and changes from
/// now on go to a new one. False when an old journal is still there (a
/// merge under way, or one a crash interrupted: the next start reads it).
pub fn rotate_journal(path: &Path) -> std::io::Result<bool> {
    if old_journal_path(path).exists() {
        return Ok(false);
    }
    match std::fs::rename(journal_path(path), old_journal_path(path)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Folds the old journal into the snapshot (after [`rotate_journal`]):
/// reads both files, never the ban table. Entries that expired are left
/// out.
pub fn merge(path: &Path) -> std::io::Result<()> {
    let _one = SNAPSHOT.lock().unwrap_or_else(|p| p.into_inner());
    let mut state = match std::fs::read(path) {
        Ok(text) => serde_json::from_slice::<StateFile>(&text).map_err(std::io::Error::other)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::empty(),
        Err(e) => return Err(e),
    };
    let old = old_journal_path(path);
    let journal = match std::fs::read(&old) {
        Ok(j) => j,
        // A whole save came first and made it redundant.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    state.apply(&journal);
    let now = unix_now();
    state.bans.retain(|b| b.expires > now);
    state.offences.retain(|o| o.until > now);
    write_snapshot(path, state.bans, state.offences)?;
    std::fs::remove_file(old)
}

/// Removes both journals: a whole snapshot was just written.
fn clear_journals(path: &Path) {
    let _ = std::fs::remove_file(journal_path(path));
    let _ = std::fs::remove_file(old_journal_path(path));
}

impl StateFile {
    fn empty() -> StateFile {
        StateFile {
            format: FORMAT.into(),
            version: VERSION,
            written: 0,
            bans: Vec::new(),
            offences: Vec::new(),
        }
    }

    /// Applies journal lines in order; a line that does not parse (a
    /// write cut short by a crash) is skipped. Returns the lines skipped.
    fn apply(&mut self, journal: &[u8]) -> usize {
        use std::collections::HashMap;
        let mut bans: HashMap<String, SavedBan> = std::mem::take(&mut self.bans)
            .into_iter()
            .map(|b| (b.target.clone(), b))
            .collect();
        let mut offences: HashMap<String, SavedOffence> = std::mem::take(&mut self.offences)
            .into_iter()
            .map(|o| (o.target.clone(), o))
            .collect();
        let mut skipped = 0;
        for line in journal.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Change>(line) {
                Ok(Change::Ban(b)) => {
                    bans.insert(b.target.clone(), b);
                }
                Ok(Change::Unban { target }) => {
                    bans.remove(&target);
                }
                Ok(Change::Offence(o)) => {
                    offences.insert(o.target.clone(), o);
                }
                Err(_) => skipped += 1,
            }
        }
        self.bans = bans.into_values().collect();
        self.offences = offences.into_values().collect();
        skipped
    }
}

/// Reads a state file. `Ok(None)` when there is none yet; `Err` with a
/// one-line reason when it is not ours or is damaged (the file is then
/// moved to `PATH.bad`, so that it is not overwritten unread). A file
/// with entries out of range gives what was valid in it, and is set aside
/// too (`Restored::set_aside`).
pub fn load(path: &Path, limits: Limits) -> Result<Option<Restored>, String> {
    let journals_exist = journal_path(path).exists() || old_journal_path(path).exists();
    let text = match std::fs::read(path) {
        Ok(t) => t,
        // Changes written before any snapshot was.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && journals_exist => {
            serde_json::to_vec(&StateFile::empty()).map_err(|e| e.to_string())?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(set_aside(path, &format!("unreadable ({e})"))),
    };
    let journals: Vec<Vec<u8>> = [old_journal_path(path), journal_path(path)]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    let now = unix_now();
    let mut r = match parse_with_journals(&text, &journals, now, limits) {
        Ok(r) => r,
        Err(why) if journals.is_empty() => return Err(set_aside(path, &why)),
        // The snapshot is damaged, the journals may not be: what they
        // hold is restored, the snapshot set aside.
        Err(why) => {
            let empty = serde_json::to_vec(&StateFile::empty()).map_err(|e| e.to_string())?;
            let mut r = parse_with_journals(&empty, &journals, now, limits)?;
            r.set_aside = Some(set_aside(path, &why));
            r
        }
    };
    if !r.invalid.is_empty() && r.set_aside.is_none() {
        r.set_aside = Some(set_aside(
            path,
            &format!("holding {} entries out of range", r.invalid.len()),
        ));
    }
    Ok(Some(r))
}

/// Parses the text of a state file as of `now` (Unix seconds): the file
/// system and the clock stay outside, so that any input can be fuzzed.
/// Never panics; `Err` says why the whole file is refused.
pub fn parse(text: &[u8], now: u64, limits: Limits) -> Result<Restored, String> {
    parse_with_journals(text, &[], now, limits)
}

/// [`parse`], then the journals' lines applied in order (lines that do
/// not parse count as invalid entries).
pub fn parse_with_journals(
    text: &[u8],
    journals: &[Vec<u8>],
    now: u64,
    limits: Limits,
) -> Result<Restored, String> {
    let mut state: StateFile =
        serde_json::from_slice(text).map_err(|e| format!("not a doh-proxy state file ({e})"))?;
    let mut skipped = 0;
    for j in journals {
        skipped += state.apply(j);
    }
    if state.format != FORMAT || state.version != VERSION {
        return Err(format!(
            "format `{}` version {}",
            state.format.chars().take(40).collect::<String>(),
            state.version
        ));
    }
    let horizon = now.saturating_add(HORIZON.as_secs());
    let mut r = Restored::default();
    r.invalid
        .extend((0..skipped.min(10)).map(|_| "a journal line that does not parse".to_string()));
    for b in state.bans {
        let checked = check_target(&b.target, limits).and_then(|net| {
            if b.expires > horizon {
                Err(format!("expires {} is past the horizon", b.expires))
            } else if b.since < EPOCH_FLOOR || b.since > now.saturating_add(86_400) {
                Err(format!("since {} is not a plausible time", b.since))
            } else {
                Ok(net)
            }
        });
        match checked {
            Ok(_) if b.expires <= now => r.dropped += 1,
            Ok(net) => r.bans.push((
                net,
                reason(&b.reason),
                UNIX_EPOCH + Duration::from_secs(b.since),
                Duration::from_secs(b.expires - now),
                b.hits,
            )),
            Err(why) => r.invalid.push(format!("ban {}: {why}", short(&b.target))),
        }
    }
    for o in state.offences {
        let checked = check_target(&o.target, limits).and_then(|net| {
            // Repeat counts are remembered for a day after the last ban.
            if o.until > now.saturating_add(super::bans::OFFENCE_MEMORY.as_secs()) {
                Err(format!("until {} is past the horizon", o.until))
            } else {
                Ok(net)
            }
        });
        match checked {
            Ok(_) if o.until <= now => r.dropped += 1,
            Ok(net) => r.offences.push((
                net,
                o.count.min(MAX_OFFENCES),
                Duration::from_secs(o.until - now),
            )),
            Err(why) => r
                .invalid
                .push(format!("repeat count {}: {why}", short(&o.target))),
        }
    }
    Ok(r)
}

/// Repeat counts above this change nothing (bans stop doubling at 16x).
const MAX_OFFENCES: u32 = 64;

/// A target as the file writes it, no wider than the ban rules allow.
fn check_target(target: &str, limits: Limits) -> Result<ipnet::IpNet, String> {
    let net = parse_target(target).ok_or_else(|| "not an address or range".to_string())?;
    let widest = match net {
        ipnet::IpNet::V4(_) => limits.prefix_v4,
        ipnet::IpNet::V6(_) => limits.prefix_v6,
    };
    if net.prefix_len() < widest {
        return Err(format!(
            "wider than /{widest}, the widest ban the rules make"
        ));
    }
    Ok(net.trunc())
}

/// At most 60 characters of what the file said, for a log line.
fn short(s: &str) -> String {
    s.chars().take(60).collect()
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

/// Where the known clients are kept: `PATH.known`, one `ADDRESS LAST_SEEN`
/// line each under a header line. Kept apart from the bans: it is written
/// whole (a minute apart, and at shutdown), and a damaged one costs only
/// itself.
pub fn known_path(path: &Path) -> PathBuf {
    beside(path, ".known")
}

const KNOWN_HEADER: &str = "doh-proxy known clients 1";

/// Writes the known clients (address, last seen) atomically.
pub fn save_known(path: &Path, known: &[(IpAddr, u64)]) -> std::io::Result<()> {
    use std::fmt::Write;
    let mut text = String::with_capacity(32 * known.len() + 32);
    text.push_str(KNOWN_HEADER);
    text.push('\n');
    for (ip, last) in known {
        let _ = writeln!(text, "{ip} {last}");
    }
    super::nft::write_atomically(&known_path(path), &text)
}

/// Known clients read back: at most `max`, none last seen more than
/// `forget` seconds before `now` or after it (untrusted input: a line that
/// does not parse, or a time out of range, is dropped and counted).
#[derive(Debug, Default)]
pub struct RestoredKnown {
    pub clients: Vec<(IpAddr, u64)>,
    pub dropped: usize,
}

pub fn load_known(path: &Path, now: u64, forget: u64, max: usize) -> Result<RestoredKnown, String> {
    let path = known_path(path);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RestoredKnown::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    parse_known(&text, now, forget, max).map_err(|why| format!("{}: {why}", set_aside(&path, why)))
}

pub fn parse_known(
    text: &[u8],
    now: u64,
    forget: u64,
    max: usize,
) -> Result<RestoredKnown, &'static str> {
    let mut lines = text.split(|b| *b == b'\n');
    if lines.next() != Some(KNOWN_HEADER.as_bytes()) {
        return Err("not a list of known clients");
    }
    let mut r = RestoredKnown::default();
    for line in lines.filter(|l| !l.is_empty()) {
        let parsed = std::str::from_utf8(line).ok().and_then(|l| {
            let (ip, last) = l.split_once(' ')?;
            Some((ip.parse::<IpAddr>().ok()?, last.parse::<u64>().ok()?))
        });
        match parsed {
            Some((ip, last))
                if r.clients.len() < max
                    && last <= now.saturating_add(60)
                    && now.saturating_sub(last) <= forget
                    && !is_unknown(ip) =>
            {
                r.clients.push((ip, last.min(now)))
            }
            _ => r.dropped += 1,
        }
    }
    Ok(r)
}

/// Whether `ip` is the shared key of unnamed clients.
pub fn is_unknown(ip: IpAddr) -> bool {
    ip == crate::net::UNKNOWN_CLIENT
}

#[cfg(test)]
mod tests;
