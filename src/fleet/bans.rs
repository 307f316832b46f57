//! Bans and repeat counts shared through Redis: pushed at (re)connection,
//! published as they are made and lifted, applied as others publish them.

use super::*;

/// Raises a repeat count to ours, never lowers it.
pub(super) const MAX_SCRIPT: &str = r#"
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > c then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"#;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BanRecord {
    reason: String,
    /// Unix seconds.
    expires: u64,
    offences: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BanMessage {
    op: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    expires: u64,
    #[serde(default)]
    offences: u32,
    origin: String,
}

impl Fleet {
    /// After a (re)connection: pushes this instance's bans and repeat
    /// counts, then loads everybody's.
    pub(super) async fn resync(&self) {
        let (bans, offences) = self.guard.export_bans();
        let now = unix_now();
        let mut pushed = false;
        for b in bans {
            if b.expires <= now {
                continue;
            }
            let record = BanRecord {
                reason: b.reason,
                expires: b.expires,
                offences: 1,
            };
            self.put_ban(&b.target, &record).await;
            pushed = true;
        }
        for o in offences {
            let k = key(&["offence", &o.target]);
            let ttl = o.until.saturating_sub(now).max(1);
            let _: Option<i64> = self
                .script(redis::Script::new(MAX_SCRIPT).key(&k).arg(o.count).arg(ttl))
                .await;
        }
        if pushed {
            // The others load them (one message, whatever their number).
            self.publish(self.message("sync", String::new())).await;
        }
        self.load_bans().await;
    }

    pub(super) async fn put_ban(&self, target: &str, record: &BanRecord) {
        let ms = record.expires.saturating_sub(unix_now()).max(1) * 1000;
        let Ok(json) = serde_json::to_string(record) else {
            return;
        };
        let _: Option<()> = self
            .run(
                redis::cmd("SET")
                    .arg(key(&["ban", target]))
                    .arg(json)
                    .arg("PX")
                    .arg(ms),
            )
            .await;
    }

    /// Loads every ban and repeat count the fleet holds.
    pub(super) async fn load_bans(&self) {
        let now = unix_now();
        self.scan("ban", |target, value, _| {
            let Some(rec) = serde_json::from_str::<BanRecord>(value).ok() else {
                return;
            };
            if rec.expires > now {
                self.guard.apply_remote_ban(
                    target,
                    &rec.reason,
                    Duration::from_secs(rec.expires - now),
                    rec.offences,
                );
            }
        })
        .await;
        self.scan("offence", |target, value, ttl| {
            if let (Ok(count), Some(ttl)) = (value.parse::<u32>(), ttl) {
                self.guard.apply_remote_offence(target, count, ttl);
            }
        })
        .await;
    }

    /// Calls `each` with the target, value and time to live of every
    /// `<kind>:<target>` key.
    pub(super) async fn scan(
        &self,
        kind: &str,
        mut each: impl FnMut(IpNet, &str, Option<Duration>),
    ) {
        let pattern = key(&[kind, "*"]);
        let strip = format!("{PREFIX}:{kind}:");
        let mut cursor = 0u64;
        loop {
            let Some((next, keys)): Option<(u64, Vec<String>)> = self
                .run(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await
            else {
                return;
            };
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
                }
                let Some(values): Option<Vec<(Option<String>, i64)>> = self.pipe(&pipe).await
                else {
                    return;
                };
                for (k, (v, ttl)) in keys.iter().zip(values) {
                    let (Some(target), Some(v)) =
                        (k.strip_prefix(&strip).and_then(parse_target), v)
                    else {
                        continue;
                    };
                    let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
                    each(target, &v, ttl);
                }
            }
            cursor = next;
            if cursor == 0 {
                return;
            }
        }
    }

    /// Applies a ban made or lifted by another instance; true when that
    /// instance has just pushed its bans after a reconnection and they are
    /// to be loaded.
    pub(super) fn on_message(&self, msg: &redis::Msg) -> bool {
        let Ok(payload) = msg.get_payload::<String>() else {
            return false;
        };
        let Ok(m) = serde_json::from_str::<BanMessage>(&payload) else {
            return false;
        };
        if m.origin == self.id {
            return false;
        }
        if m.op == "sync" {
            return true;
        }
        let Some(target) = parse_target(&m.target) else {
            return false;
        };
        match m.op.as_str() {
            "ban" => {
                let left = m.expires.saturating_sub(unix_now());
                if left > 0 {
                    self.guard.apply_remote_ban(
                        target,
                        &m.reason,
                        Duration::from_secs(left),
                        m.offences,
                    );
                }
            }
            "unban" => self.guard.apply_remote_unban(target),
            _ => {}
        }
        false
    }

    /// A message from this instance, with no ban details.
    pub(super) fn message(&self, op: &str, target: String) -> BanMessage {
        BanMessage {
            op: op.into(),
            target,
            reason: String::new(),
            expires: 0,
            offences: 0,
            origin: self.id.clone(),
        }
    }

    pub(super) async fn publish(&self, msg: BanMessage) {
        if let Ok(json) = serde_json::to_string(&msg) {
            let _: Option<i64> = self
                .run(redis::cmd("PUBLISH").arg(key(&["bans"])).arg(json))
                .await;
        }
    }

    /// Publishes this instance's bans and lifts.
    pub(super) async fn publisher(
        self: Arc<Self>,
        mut events: mpsc::Receiver<BanEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let ev = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => return },
                _ = shutdown.cancelled() => return,
            };
            if !self.is_up() {
                // Pushed at the next resynchronisation.
                continue;
            }
            let msg = match ev {
                BanEvent::Ban {
                    target,
                    reason,
                    expires,
                    offences,
                } => {
                    let t = target_label(&target);
                    self.put_ban(
                        &t,
                        &BanRecord {
                            reason: reason.to_string(),
                            expires,
                            offences,
                        },
                    )
                    .await;
                    if crate::net::is_host(&target) {
                        // A ban makes the client unknown to the fleet too.
                        let _: Option<i64> = self
                            .run(
                                redis::cmd("ZREM")
                                    .arg(key(&["known"]))
                                    .arg(target.addr().to_string()),
                            )
                            .await;
                    }
                    let k = key(&["offence", &t]);
                    let _: Option<()> = self
                        .run(redis::cmd("SET").arg(&k).arg(offences).arg("EX").arg(86400))
                        .await;
                    BanMessage {
                        reason: reason.to_string(),
                        expires,
                        offences,
                        ..self.message("ban", t)
                    }
                }
                BanEvent::Unban { target } => {
                    let t = target_label(&target);
                    let _: Option<()> = self.run(redis::cmd("DEL").arg(key(&["ban", &t]))).await;
                    self.message("unban", t)
                }
            };
            self.publish(msg).await;
        }
    }
}
