//! The penalty box's side of the guard: scoring refusals, banning and
//! lifting, the events the fleet publishes, bans made elsewhere, and the
//! views the admin listener shows.

use super::*;

impl Guard {
    /// Adds a refusal to the client's score if its reason scores; bans the
    /// client when the score reaches `--ban-after` within a minute.
    pub fn penalize(&self, client: IpAddr, reason: impl Refusal) {
        if !reason.scored() {
            return;
        }
        let client = canonical(client);
        let s = self.settings.load();
        if self.exempt(&s, client) {
            return;
        }
        if self.penalty.score(client, s.ban_after) {
            self.ban(IpNet::from(client), reason.label());
        }
    }

    /// Bans `target` (an address or a prefix) for `--ban-secs`, longer for
    /// repeat offenders. Allowlisted and trusted ranges are never banned.
    pub fn ban(&self, target: IpNet, reason: &'static str) {
        let target = target.trunc();
        let s = self.settings.load();
        let protected = |list: &[Cidr]| list.iter().any(|a| overlaps(&a.0, &target));
        if protected(&s.allow) || protected(&s.trusted) {
            return;
        }
        let host = is_host(&target);
        if s.dry_run {
            self.metrics.guard.ban(!host, true);
            tracing::warn!(target = %target, reason, "dry run: would ban");
            return;
        }
        // A ban makes the client (or the prefix's clients) unknown again.
        self.known.forget(&target);
        let offences = self.bans.count_offence(target);
        let factor = (1u64 << offences.min(4)).min(MAX_BAN_FACTOR);
        let secs = s.ban_secs.saturating_mul(factor);
        let prefix = host.then(|| prefix_of(target.addr(), s.prefix_v4, s.prefix_v6));
        let added = self.bans.add(target, reason, secs, prefix);
        self.metrics.guard.bans_active.set(self.bans.len() as i64);
        self.metrics.guard.ban(!host, false);
        self.emit(BanEvent::Ban {
            target,
            reason,
            expires: unix_now() + secs,
            offences: offences + 1,
        });
        tracing::warn!(
            target = %crate::net::client_label(target.addr()),
            reason, secs, offences = offences + 1, "banned"
        );
        if let Some(evicted) = added.evicted {
            tracing::warn!(target = %evicted, "ban table full: the ban closest to expiry gave way");
        }
        if let Some(prefix) = added.escalate {
            self.ban(prefix, "prefix");
        }
    }

    /// Lifts the ban on exactly `target`; returns whether there was one.
    pub fn unban(&self, target: IpNet) -> bool {
        let target = target.trunc();
        let removed = self.bans.remove(&target);
        self.metrics.guard.bans_active.set(self.bans.len() as i64);
        if removed {
            tracing::info!(target = %target, "ban lifted by the operator");
        }
        self.emit(BanEvent::Unban { target });
        removed
    }

    /// Bans and lifts made here will be told to the receiver returned.
    pub fn subscribe_events(&self) -> tokio::sync::mpsc::Receiver<BanEvent> {
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        let _ = self.events.set(tx);
        rx
    }

    pub(super) fn emit(&self, ev: BanEvent) {
        if let Some(tx) = self.events.get() {
            // Never wait: a full queue drops the event (the next
            // resynchronisation carries the ban anyway).
            let _ = tx.try_send(ev);
        }
    }

    /// A ban another instance made: enforced here for what is left of it,
    /// its repeat count remembered; not told again. Allowlisted and
    /// trusted ranges are never banned, whoever asks.
    pub fn apply_remote_ban(
        &self,
        target: IpNet,
        reason: &str,
        remaining: std::time::Duration,
        offences: u32,
    ) {
        let target = target.trunc();
        let s = self.settings.load();
        let protected = |list: &[Cidr]| list.iter().any(|a| overlaps(&a.0, &target));
        if protected(&s.allow) || protected(&s.trusted) || s.dry_run {
            return;
        }
        let host = is_host(&target);
        let prefix = host.then(|| prefix_of(target.addr(), s.prefix_v4, s.prefix_v6));
        let reason = state::static_reason(reason);
        self.known.forget(&target);
        self.bans.restore(
            target,
            reason,
            std::time::SystemTime::now(),
            remaining,
            0,
            prefix,
            true,
        );
        if offences > self.bans.offences(&target) {
            self.bans
                .restore_offence(target, offences, std::time::Duration::from_secs(86400));
        }
        self.metrics.guard.bans_active.set(self.bans.len() as i64);
    }

    /// A repeat count another instance holds: ours is raised to it.
    pub fn apply_remote_offence(&self, target: IpNet, count: u32, remaining: std::time::Duration) {
        let target = target.trunc();
        if count > self.bans.offences(&target) {
            self.bans.restore_offence(target, count, remaining);
        }
    }

    /// A ban another instance lifted.
    pub fn apply_remote_unban(&self, target: IpNet) {
        if self.bans.remove(&target.trunc()) {
            self.metrics.guard.bans_active.set(self.bans.len() as i64);
            tracing::info!(target = %target, "ban lifted on another instance");
        }
    }

    /// Bans in force and repeat counts, to share them.
    pub fn export_bans(&self) -> (Vec<bans::SavedBan>, Vec<bans::SavedOffence>) {
        self.bans.export()
    }

    /// Active bans, soonest to expire first.
    pub fn bans(&self) -> Vec<BanView> {
        self.bans.views()
    }

    /// A page of [`Guard::bans`]: at most `limit` after the ban on `after`
    /// (`None`: no ban on `after` any more).
    pub fn bans_page(&self, after: Option<&IpNet>, limit: usize) -> Option<Vec<BanView>> {
        self.bans.page(after.map(|n| n.trunc()).as_ref(), limit)
    }
}
