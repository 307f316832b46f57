//! What a request meets first, after its connection was admitted: its
//! client's ban, then one request of its budgets (the client's address
//! and prefix, or a named relay's own), with the settings read once.

use std::net::IpAddr;

use super::{Budget, Conn, Guard, GuardSettings, Verdict};
use crate::net::{canonical, prefix_of};

/// What a request meets first ([`Guard::screen`]): its client's ban,
/// and unless the ban refuses it, its budget.
#[derive(Debug, PartialEq, Eq)]
pub struct Screen {
    pub ban: Verdict,
    pub budget: Budget,
}

impl Guard {
    /// Whether a request from `client` is refused as banned. In dry-run a
    /// ban only counts: the verdict is [`Verdict::DryRun`].
    pub fn banned(&self, client: IpAddr) -> Verdict {
        let client = canonical(client);
        let s = self.settings.load();
        self.ban_verdict(&s, client, self.exempt(&s, client))
    }

    fn ban_verdict(&self, s: &GuardSettings, client: IpAddr, exempt: bool) -> Verdict {
        if exempt || !self.bans.covers(client) {
            Verdict::Pass
        } else if s.dry_run {
            Verdict::DryRun
        } else {
            Verdict::Refuse
        }
    }

    /// What a request from `client` meets first: its ban, then (unless
    /// the ban refuses it) one request of its budgets: a named relay's
    /// own for its sealed queries (`relayed`: a relay carries many
    /// clients, so it has its own, larger one), else the client's address
    /// and prefix, through `conn`'s held buckets when given.
    pub fn screen(&self, client: IpAddr, conn: Option<&Conn>, relayed: bool) -> Screen {
        let client = canonical(client);
        let s = self.settings.load();
        let exempt = self.exempt(&s, client);
        let ban = self.ban_verdict(&s, client, exempt);
        let over = if ban == Verdict::Refuse || exempt {
            None
        } else if relayed {
            self.relay_budget.check(&client).err()
        } else {
            self.spend(&s, client, conn)
        };
        let budget = match over {
            None => Budget::Ok,
            Some(_) if s.dry_run => Budget::DryRun,
            Some(wait) => Budget::Over(wait.as_secs() + 1),
        };
        Screen { ban, budget }
    }

    /// Spends one request of the client's budgets (address, then prefix).
    pub fn check_budget(&self, client: IpAddr) -> Budget {
        self.screen(client, None, false).budget
    }

    /// Spends one request of the client's address budget, then of its
    /// prefix's; over either, how long until a token is back.
    fn spend(
        &self,
        s: &GuardSettings,
        client: IpAddr,
        conn: Option<&Conn>,
    ) -> Option<std::time::Duration> {
        let prefix = || prefix_of(client, s.prefix_v4, s.prefix_v6);
        match conn {
            Some(c) => {
                let held = c.budgets();
                self.ip_budget
                    .check_held(&held.ip, &client)
                    .err()
                    .or_else(|| self.prefix_budget.check_held(&held.prefix, &prefix()).err())
            }
            None => self
                .ip_budget
                .check(&client)
                .err()
                .or_else(|| self.prefix_budget.check(&prefix()).err()),
        }
    }
}
