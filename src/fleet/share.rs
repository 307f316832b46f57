//! What the fleet counts and keys together: known clients, the
//! unique-client sketches, TLS ticket keys and the ODoH key.

use super::*;

/// Replaces the ODoH key only if it is still the one we saw.
pub(super) const SWAP_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
pub(super) struct OdohRecord {
    seed: String,
    /// Unix seconds.
    born: u64,
}

impl Fleet {
    /// Known clients, shared: those that became known or were answered
    /// here since the last push go into the sorted set `known` (scored by
    /// when last seen, never lowered), which is trimmed to `--known-max`
    /// and `--known-forget-secs`; those the others added since the last
    /// pull become known here (unless banned here). At most
    /// [`KNOWN_BATCH`] each way every 2 s.
    pub(super) async fn share_known(&self) {
        let s = self.guard.settings();
        let now = unix_now();
        let set = key(&["known"]);
        let since = self.known_pushed.load(Ordering::Relaxed);
        let ours = self.guard.known().known_since(since, KNOWN_BATCH);
        if !ours.is_empty() {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&set).arg("GT");
            for (ip, last) in &ours {
                zadd.arg(*last).arg(ip.to_string());
            }
            let mut pipe = redis::pipe();
            pipe.add_command(zadd)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&set)
                .arg(0)
                .arg(now.saturating_sub(s.known_forget_secs))
                .ignore()
                .cmd("ZREMRANGEBYRANK")
                .arg(&set)
                .arg(0)
                .arg(
                    -(i64::try_from(s.known_max)
                        .unwrap_or(i64::MAX)
                        .saturating_add(1)),
                )
                .ignore();
            if self.pipe::<()>(&pipe).await.is_some() {
                // One second back: a client answered later in this second
                // is pushed again, never missed.
                self.known_pushed
                    .store(now.saturating_sub(1), Ordering::Relaxed);
            }
        }
        let from = self.known_pulled.load(Ordering::Relaxed);
        let Some(theirs): Option<Vec<(String, u64)>> = self
            .run(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&set)
                    .arg(from.max(now.saturating_sub(s.known_forget_secs)))
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(KNOWN_BATCH),
            )
            .await
        else {
            return;
        };
        let mut newest = from;
        for (member, last) in &theirs {
            newest = newest.max(*last);
            let Ok(ip) = member.parse::<std::net::IpAddr>() else {
                continue;
            };
            if self.guard.banned(ip) == crate::guard::Verdict::Pass {
                self.guard.known().make_known(ip, (*last).min(now));
            }
        }
        if theirs.len() == KNOWN_BATCH && newest == from {
            newest += 1; // a full page of one score: move on
        }
        // Two seconds back: what others pushed late is read again.
        self.known_pulled
            .store(newest.min(now).saturating_sub(2), Ordering::Relaxed);
    }

    /// Puts this instance's sketch of the last 24 hours in Redis (a dense
    /// HyperLogLog under its own key) and counts the union of the fleet's.
    pub(super) async fn share_clients(&self) {
        let now = unix_now();
        let ours = key(&["clients", &self.id]);
        let index = key(&["clients"]);
        let _: Option<()> = self
            .run(
                redis::cmd("SET")
                    .arg(&ours)
                    .arg(self.unique.redis_dense())
                    .arg("EX")
                    .arg(SKETCH_TTL_SECS),
            )
            .await;
        let _: Option<i64> = self
            .run(redis::cmd("ZADD").arg(&index).arg(now).arg(&self.id))
            .await;
        let _: Option<i64> = self
            .run(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&index)
                    .arg(0)
                    .arg(now.saturating_sub(SKETCH_TTL_SECS)),
            )
            .await;
        let Some(ids): Option<Vec<String>> = self
            .run(
                redis::cmd("ZREVRANGE")
                    .arg(&index)
                    .arg(0)
                    .arg(MAX_SKETCHES - 1),
            )
            .await
        else {
            return;
        };
        let keys: Vec<String> = ids.iter().map(|id| key(&["clients", id])).collect();
        if let Some(n) = self.run::<u64>(redis::cmd("PFCOUNT").arg(keys)).await {
            self.fleet_unique.store(n, Ordering::Relaxed);
        }
    }

    /// Shares the TLS ticket keys: the key of each period is the first
    /// one an instance put in Redis; every instance installs the current
    /// and the previous period's, so that a client resumes on any of them.
    /// They expire from Redis when no instance may use them any more.
    pub(super) async fn sync_tickets(&self) {
        let Some(t) = &self.tickets else { return };
        let period = t.period();
        let k = |p: u64| key(&["tls-ticket", &p.to_string()]);
        if let Some(fresh) = t.generate() {
            let _: Option<Option<String>> = self
                .run(
                    redis::cmd("SET")
                        .arg(k(period))
                        .arg(hex(&fresh))
                        .arg("NX")
                        .arg("EX")
                        .arg(3 * t.lifetime_secs()),
                )
                .await;
        }
        let Some(both): Option<Vec<Option<String>>> = self
            .run(
                redis::cmd("MGET")
                    .arg(k(period.saturating_sub(1)))
                    .arg(k(period)),
            )
            .await
        else {
            return;
        };
        for (p, secret) in [period.saturating_sub(1), period].into_iter().zip(both) {
            if let Some(s) = secret.as_deref().and_then(unhex::<SECRET_LEN>) {
                t.install(p, &s);
            }
        }
    }

    /// Shares the ODoH key: the one in Redis is installed; none there, ours
    /// is put there; when it is older than `rotate`, one instance replaces
    /// it (an atomic compare-and-swap) and every instance follows.
    pub async fn sync_odoh(&self, odoh: &crate::odoh::Odoh, rotate: Duration) {
        if !self.is_up() {
            return;
        }
        let k = key(&["odoh"]);
        let current: Option<Option<String>> = self.run(redis::cmd("GET").arg(&k)).await;
        let Some(current) = current else { return };
        let ours = odoh.current();
        let record = |key: &crate::odoh::Key| OdohRecord {
            seed: hex(&key.seed),
            born: key.born_unix(),
        };
        match current.and_then(|s| serde_json::from_str::<OdohRecord>(&s).ok().map(|r| (s, r))) {
            None => {
                if let Ok(json) = serde_json::to_string(&record(&ours)) {
                    let _: Option<Option<String>> = self
                        .run(redis::cmd("SET").arg(&k).arg(json).arg("NX"))
                        .await;
                }
            }
            Some((raw, shared)) => {
                if shared.born + rotate.as_secs() <= unix_now() {
                    let Ok(fresh) = crate::odoh::Key::generate() else {
                        return;
                    };
                    let Ok(json) = serde_json::to_string(&record(&fresh)) else {
                        return;
                    };
                    let swapped: Option<i64> = self
                        .script(redis::Script::new(SWAP_SCRIPT).key(&k).arg(&raw).arg(&json))
                        .await;
                    if swapped == Some(1) {
                        let _ = odoh.install(fresh);
                    }
                    return;
                }
                if shared != record(&ours) {
                    if let Some(key) = unhex(&shared.seed)
                        .and_then(|seed| crate::odoh::Key::from_shared(seed, shared.born).ok())
                    {
                        let _ = odoh.install(key);
                    }
                }
            }
        }
    }
}
