//! The fleet's upstream budget: tokens leased from Redis in batches and
//! spent locally, a conservative local share while Redis is away.

use super::*;

/// The atomic lease of upstream tokens: a windowed counter per second
/// (`KEYS[1]`), granting at most what is left of the fleet's budget. Tokens
/// an instance spent on its own while a lease was late (`ARGV[3]`) are
/// charged first, and what the second cannot hold is carried into the
/// next one (`KEYS[2]`), so that the fleet's spending over time stays
/// within the budget.
///
/// The known clients' share (`--known-share`): `KEYS[3]` counts what leases
/// for known clients took this second. A lease for new clients (`ARGV[5]`
/// 0) leaves room for what the known clients have not leased of their
/// share this second (`ARGV[4]` tokens), until the last tenth of the
/// second (`ARGV[6]` ms of it gone), over which it is released: known
/// clients asking all at once find their share most of the second, and a
/// crowd alone still gets the whole budget of every second.
/// Returns the tokens granted, or -1 when the second's budget is spent.
pub(super) const LEASE_SCRIPT: &str = r#"
local limit = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[3])
local total = limit - used
local room = total
if ARGV[5] == '0' then
  local share = tonumber(ARGV[4])
  local held = math.min(math.ceil(share * math.min(1, (1000 - tonumber(ARGV[6])) / 100)),
    share - tonumber(redis.call('GET', KEYS[3]) or '0'))
  if held > 0 then room = room - held end
end
local grant = math.min(tonumber(ARGV[1]), math.max(0, room))
used = used + grant
if used > limit then
  redis.call('INCRBY', KEYS[2], used - limit)
  redis.call('PEXPIRE', KEYS[2], 3000)
  used = limit
end
redis.call('SET', KEYS[1], used, 'PX', 2000)
if ARGV[5] == '1' and grant > 0 then
  redis.call('INCRBY', KEYS[3], grant)
  redis.call('PEXPIRE', KEYS[3], 2000)
end
if grant == 0 and total <= 0 then return -1 end
return grant
"#;

impl Fleet {
    /// Leases upstream tokens for the current second, in batches of 50 ms'
    /// worth, when the local supply runs low.
    pub(super) async fn lease(self: Arc<Self>, shutdown: CancellationToken) {
        let script = redis::Script::new(LEASE_SCRIPT);
        loop {
            tokio::select! {
                _ = self.refill.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.is_up() {
                self.refilled.notify_waiters();
                continue;
            }
            let qps = self.qps.load(Ordering::Relaxed).max(1);
            let batch = i64::from((qps / 20).max(1));
            let owed = self.debt.swap(0, Ordering::Relaxed);
            let for_known = self.want_known.swap(false, Ordering::Relaxed);
            let share = self.share.load(Ordering::Relaxed);
            let reserve = u64::from(qps) * u64::from(share) / 100;
            let now = crate::clock::since_epoch();
            let (sec, ms) = (now.as_secs(), now.subsec_millis());
            let granted: Option<i64> = self
                .script(
                    script
                        .key(key(&["budget", &sec.to_string()]))
                        .key(key(&["budget", &(sec + 1).to_string()]))
                        .key(key(&["budget-known", &sec.to_string()]))
                        .arg(batch)
                        .arg(qps)
                        .arg(owed)
                        .arg(if self.dry_run { 0 } else { reserve })
                        .arg(u8::from(for_known))
                        .arg(ms),
                )
                .await;
            // None: Redis is down now, and the debt goes with the fleet's view.
            if let Some(g) = granted {
                let end_of_second = (sec + 1) * 1000;
                if g <= 0 && !for_known {
                    self.pressed
                        .store(sec * 1000 + u64::from(ms) + 1000, Ordering::Relaxed);
                }
                if g < 0 {
                    self.exhausted.store(end_of_second, Ordering::Relaxed);
                    self.exhausted_known.store(end_of_second, Ordering::Relaxed);
                } else if g == 0 && !for_known {
                    let later = sec * 1000 + u64::from(ms) + 50;
                    self.exhausted
                        .store(later.min(end_of_second), Ordering::Relaxed);
                }
                let g = g.max(0);
                let pool = if for_known {
                    &self.leased_known
                } else {
                    &self.leased
                };
                if self.window.swap(sec, Ordering::Relaxed) != sec {
                    // A new second: what is left of the last one is void.
                    self.leased.store(0, Ordering::Relaxed);
                    self.leased_known.store(0, Ordering::Relaxed);
                }
                pool.fetch_add(g, Ordering::Relaxed);
            }
            self.refilled.notify_waiters();
        }
    }

    /// Records local-share tokens the fleet's counter has not seen yet,
    /// at most [`MAX_DEBT_SECS`] of budget.
    pub(super) fn owe(&self, n: i64) {
        let cap = i64::from(self.qps.load(Ordering::Relaxed)) * MAX_DEBT_SECS;
        let _ = self
            .debt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some((d + n).min(cap))
            });
    }

    /// Takes a leased token: a known client from the known clients'
    /// leases first, then from anybody's.
    pub(super) fn take(&self, who: Who) -> bool {
        if self.window.load(Ordering::Relaxed) != unix_now() {
            return false;
        }
        let pools: &[&AtomicI64] = match who {
            Who::Known => &[&self.leased_known, &self.leased],
            Who::New => &[&self.leased],
        };
        for pool in pools {
            let left = pool.fetch_sub(1, Ordering::Relaxed);
            if left > 0 {
                let batch = i64::from((self.qps.load(Ordering::Relaxed) / 20).max(1));
                if left <= batch / 2 && std::ptr::eq(*pool, &self.leased) {
                    self.refill.notify_one();
                }
                return true;
            }
            pool.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// Whether the fleet's budget for `who` ran out this second.
    pub(super) fn spent(&self, who: Who) -> bool {
        let now = unix_ms();
        let until = match who {
            Who::Known => &self.exhausted_known,
            Who::New => &self.exhausted,
        };
        now < until.load(Ordering::Relaxed)
    }

    /// The local share of the budget, for when Redis cannot lease (with
    /// the known clients' part of it).
    pub(super) fn local_share(&self, who: Who) -> bool {
        let qps = self.qps.load(Ordering::Relaxed) / self.peers.load(Ordering::Relaxed).max(1);
        let known = u8::try_from(self.share.load(Ordering::Relaxed)).unwrap_or(100);
        let Ok(mut f) = self.fallback.lock() else {
            return false;
        };
        if (f.0, f.1) != (qps, known) {
            *f = (qps, known, limiter(qps, known, self.dry_run));
        }
        f.2.take(who)
    }
}

impl Spend for Fleet {
    fn spend_now(&self, who: Who) -> Option<bool> {
        if !self.is_up() {
            return Some(self.local_share(who));
        }
        // A token in the lease: no wait. Else `spend` asks the fleet.
        self.take(who).then_some(true)
    }

    fn spend(&self, who: Who) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.is_up() {
                return self.local_share(who);
            }
            if self.take(who) {
                return true;
            }
            if self.spent(who) {
                // The fleet has spent this second's budget: no need to ask.
                return false;
            }
            let waiting = self.refilled.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            if who == Who::Known && self.share.load(Ordering::Relaxed) > 0 {
                self.want_known.store(true, Ordering::Relaxed);
            }
            self.refill.notify_one();
            let _ = tokio::time::timeout(LEASE_WAIT, waiting).await;
            if self.take(who) {
                return true;
            }
            if !self.is_up() {
                return self.local_share(who);
            }
            if self.spent(who) {
                // The fleet has spent this second's budget.
                return false;
            }
            // The lease is late (Redis slow, this instance busy) or went to
            // other queries before this one: the query does not wait longer
            // but spends the local share, which the next lease charges to
            // the fleet — unless new clients are being held back for the
            // known clients' share.
            if who == Who::New && unix_ms() < self.pressed.load(Ordering::Relaxed) {
                return false;
            }
            if self.local_share(who) {
                self.owe(1);
                return true;
            }
            false
        })
    }
}
