//! The alerting rules and the Grafana dashboard in examples/ are valid and
//! only use metric names the proxy really exposes.

use std::collections::BTreeSet;
use std::process::Command;

use crate::common::*;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/prometheus-alerts.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/grafana-dashboard.json"
);

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("doh_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end] == b'_' || b[end].is_ascii_digit())
        {
            end += 1;
        }
        names.insert(text[start..end].to_string());
        i = end;
    }
    names
}

#[test]
fn rules_pass_promtool() {
    match Command::new("promtool")
        .args(["check", "rules", RULES])
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            // No promtool: at least the shape of a rules file.
            let text = std::fs::read_to_string(RULES).unwrap();
            assert!(text.contains("groups:"));
            assert_eq!(
                text.matches("- alert:").count(),
                text.matches("expr:").count()
            );
        }
    }
}

#[tokio::test]
async fn every_metric_used_is_exposed() {
    let up = MockUpstream::start().await;
    let p = proxy(&[up.addr], |_| {}).await;
    send(
        &p,
        Proto::H2,
        get(&get_path(&query("www.example.test", 1, 1))),
    )
    .await;
    let exposed =
        String::from_utf8_lossy(&admin(&p, "GET", "/metrics", None).await.body).to_string();
    let dashboard = std::fs::read_to_string(DASHBOARD).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let rules = std::fs::read_to_string(RULES).unwrap();
    let used = metric_names(&format!("{rules}\n{dashboard}"));
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        assert!(
            exposed
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "{name} is used in examples/ but not exposed"
        );
    }
}
