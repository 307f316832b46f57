use super::*;

const LIMITS: Limits = Limits {
    prefix_v4: 24,
    prefix_v6: 56,
};

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
    let r = load(&p, LIMITS).unwrap().unwrap();
    assert_eq!(r.bans.len(), 2);
    assert_eq!(r.dropped, 1);
    assert_eq!(r.bans[0].1, "obsolete_draft");
    assert!(r.bans[0].3 > Duration::from_secs(590));
    assert!(is_unknown(r.bans[1].0.addr()));
    assert_eq!(r.offences[0].1, 2);
}

#[test]
fn known_clients_round_trip_and_hostile_lines_drop() {
    let path = temp("known");
    let now = unix_now();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    save_known(
        &path,
        &[(ip("192.0.2.1"), now - 10), (ip("2001:db8::1"), now)],
    )
    .unwrap();
    let r = load_known(&path, now, 3600, 10).unwrap();
    assert_eq!(
        r.clients,
        vec![(ip("192.0.2.1"), now - 10), (ip("2001:db8::1"), now)]
    );
    // Forgotten, in the future, garbage, too many.
    let text = format!(
        "{KNOWN_HEADER}\n192.0.2.1 {}\n192.0.2.2 {}\n192.0.2.3 18446744073709551615\nnope\n\u{0} 1\n192.0.2.4 {now}\n192.0.2.5 {now}\n",
        now - 7200,
        now + 3600,
    );
    let r = parse_known(text.as_bytes(), now, 3600, 1).unwrap();
    assert_eq!(r.clients, vec![(ip("192.0.2.4"), now)]);
    assert_eq!(r.dropped, 6);
    assert!(parse_known(b"{\"format\": 1}", now, 3600, 10).is_err());
    std::fs::write(known_path(&path), b"garbage").unwrap();
    assert!(load_known(&path, now, 3600, 10).is_err());
    assert!(!known_path(&path).exists(), "set aside");
}

#[test]
fn a_damaged_file_is_set_aside_not_fatal() {
    let p = temp("bad.json");
    std::fs::write(&p, "{\"format\": \"doh-proxy state\", \"vers").unwrap();
    let e = load(&p, LIMITS).unwrap_err();
    assert!(e.contains("not a doh-proxy state file"), "{e}");
    assert!(!p.exists());
    assert!(temp("bad.json.bad").exists());
    assert!(load(&temp("none.json"), LIMITS).unwrap().is_none());
    std::fs::write(
        &p,
        "{\"format\":\"other\",\"version\":1,\"written\":0,\"bans\":[],\"offences\":[]}",
    )
    .unwrap();
    assert!(load(&p, LIMITS).unwrap_err().contains("format `other`"));
}

fn file(bans: &str, offences: &str) -> String {
    format!(
        "{{\"format\":\"doh-proxy state\",\"version\":1,\"written\":0,\"bans\":[{bans}],\"offences\":[{offences}]}}"
    )
}

#[test]
fn numbers_out_of_range_drop_their_entry_never_panic() {
    let now = unix_now();
    let max = u64::MAX;
    let ok = format!(
        "{{\"target\":\"192.0.2.1/32\",\"reason\":\"manual\",\"since\":{},\"expires\":{},\"hits\":1}}",
        now - 5,
        now + 60
    );
    let cases = [
        format!("{{\"target\":\"192.0.2.2/32\",\"reason\":\"x\",\"since\":{now},\"expires\":{max},\"hits\":{max}}}"),
        format!("{{\"target\":\"192.0.2.3/32\",\"reason\":\"x\",\"since\":{max},\"expires\":{},\"hits\":0}}", now + 60),
        format!("{{\"target\":\"0.0.0.0/0\",\"reason\":\"x\",\"since\":{now},\"expires\":{},\"hits\":0}}", now + 60),
        format!("{{\"target\":\"2001:db8::/32\",\"reason\":\"x\",\"since\":{now},\"expires\":{},\"hits\":0}}", now + 60),
        format!("{{\"target\":\"300.1.1.1\",\"reason\":\"x\",\"since\":{now},\"expires\":{},\"hits\":0}}", now + 60),
    ];
    for bad in &cases {
        let text = file(&format!("{ok},{bad}"), "");
        let r = parse(text.as_bytes(), now, LIMITS).unwrap();
        assert_eq!(r.bans.len(), 1, "{bad}");
        assert_eq!(r.invalid.len(), 1, "{bad}");
    }
    let text = file(
        "",
        &format!("{{\"target\":\"192.0.2.9/32\",\"count\":4294967295,\"until\":{max}}}"),
    );
    let r = parse(text.as_bytes(), now, LIMITS).unwrap();
    assert!(r.offences.is_empty() && r.invalid.len() == 1);
    // The widest prefix the rules make is restored.
    let text = file(
        &format!("{{\"target\":\"198.51.100.0/24\",\"reason\":\"prefix\",\"since\":{now},\"expires\":{},\"hits\":0}}", now + 60),
        "",
    );
    assert_eq!(parse(text.as_bytes(), now, LIMITS).unwrap().bans.len(), 1);
}

#[test]
fn a_file_with_invalid_entries_is_set_aside_with_the_rest_restored() {
    let p = temp("range.json");
    let now = unix_now();
    let text = file(
        &format!(
            "{{\"target\":\"192.0.2.1/32\",\"reason\":\"manual\",\"since\":{now},\"expires\":{},\"hits\":1}},\
             {{\"target\":\"192.0.2.2/32\",\"reason\":\"manual\",\"since\":{now},\"expires\":18446744073709551615,\"hits\":1}}",
            now + 60
        ),
        "",
    );
    std::fs::write(&p, text).unwrap();
    let r = load(&p, LIMITS).unwrap().unwrap();
    assert_eq!(r.bans.len(), 1);
    assert!(r.set_aside.is_some());
    assert!(!p.exists() && temp("range.json.bad").exists());
}

#[test]
fn the_journal_replays_onto_the_snapshot_and_merges_away() {
    let dir = std::env::temp_dir().join(format!("doh-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("state.json");
    let now = unix_now();
    let ban = |t: &str| {
        Change::Ban(SavedBan {
            target: t.into(),
            reason: "manual".into(),
            since: now,
            expires: now + 600,
            hits: 0,
        })
    };
    // Changes before any snapshot: read back all the same.
    append(&p, &[ban("192.0.2.1/32"), ban("192.0.2.2/32")]).unwrap();
    let r = load(&p, LIMITS).unwrap().unwrap();
    assert_eq!(r.bans.len(), 2);
    // A merge: the journal moves aside, new changes go to a new one.
    assert!(rotate_journal(&p).unwrap());
    append(
        &p,
        &[Change::Unban {
            target: "192.0.2.1/32".into(),
        }],
    )
    .unwrap();
    assert!(!rotate_journal(&p).unwrap(), "one merge at a time");
    merge(&p).unwrap();
    assert!(p.exists() && !old_journal_path(&p).exists());
    let r = load(&p, LIMITS).unwrap().unwrap();
    let targets: Vec<String> = r.bans.iter().map(|b| b.0.to_string()).collect();
    assert_eq!(targets, vec!["192.0.2.2/32".to_string()]);
    // A line cut short by a crash is skipped, the rest kept; replaying
    // a line twice changes nothing.
    append(&p, &[ban("192.0.2.3/32"), ban("192.0.2.3/32")]).unwrap();
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(journal_path(&p))
            .unwrap();
        f.write_all(b"{\"ban\":{\"target\":\"192.0.2.4/32\",\"rea")
            .unwrap();
    }
    let r = parse_with_journals(
        &std::fs::read(&p).unwrap(),
        &[std::fs::read(journal_path(&p)).unwrap()],
        now,
        LIMITS,
    )
    .unwrap();
    assert_eq!(r.bans.len(), 2);
    assert_eq!(r.invalid.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_snapshot_sets_aside_only_itself() {
    let dir = std::env::temp_dir().join(format!("doh-journal-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("state.json");
    let now = unix_now();
    append(
        &p,
        &[Change::Ban(SavedBan {
            target: "192.0.2.7/32".into(),
            reason: "manual".into(),
            since: now,
            expires: now + 600,
            hits: 0,
        })],
    )
    .unwrap();
    std::fs::write(&p, "{\"format\": \"doh-proxy state\", \"vers").unwrap();
    let r = load(&p, LIMITS).unwrap().unwrap();
    assert_eq!(r.bans.len(), 1, "the journal's ban is restored");
    assert!(r.set_aside.unwrap().contains("not a doh-proxy state file"));
    assert!(beside(&p, ".bad").exists() && journal_path(&p).exists());
    let _ = std::fs::remove_dir_all(&dir);
}
