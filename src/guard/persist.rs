//! What the guard keeps across restarts: the state file (journal and
//! snapshot), the known clients beside it, and the nftables ban file.

use super::*;

impl Guard {
    /// Writes what changed: the state file's journal (O(changes)), a
    /// merge of it into the snapshot now and then (in a background thread,
    /// from the files), and the ban file when bans changed (at most once a
    /// second, every 5 s past 10,000 bans, built in a background thread
    /// from a copy taken a thousand bans per lock).
    pub(super) fn persist(&self) {
        let s = self.settings.load();
        let (changes, overflowed) = self.bans.take_changes();
        if let Some(path) = &s.state_file {
            let r = if overflowed || self.snapshot_due.swap(false, Ordering::Relaxed) {
                self.save_state()
            } else if changes.is_empty() {
                Ok(())
            } else {
                state::append(path, &changes).map(|()| self.journaled(path, changes.len()))
            };
            if let Err(e) = r {
                // Whatever was lost, a whole snapshot puts right.
                self.snapshot_due.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "cannot write the state file");
            }
        }
        let now = self.epoch.elapsed().as_secs();
        if let Some(path) = &s.state_file {
            if now % 60 == 59 {
                self.save_known(path);
            }
        }
        let every = if self.bans.len() > 10_000 { 5 } else { 1 };
        if s.ban_file.is_some()
            && now >= self.ban_file_written.load(Ordering::Relaxed) + every
            && self.bans.take_dirty()
        {
            self.ban_file_written.store(now, Ordering::Relaxed);
            self.write_ban_file();
        }
    }

    /// `n` more lines in the journal: once it holds more lines than there
    /// are bans (and at least 4,096), merge it into the snapshot.
    pub(super) fn journaled(&self, path: &std::path::Path, n: usize) {
        let lines = self.journal_lines.fetch_add(n, Ordering::Relaxed) + n;
        if lines < self.bans.len().max(4096) {
            return;
        }
        match state::rotate_journal(path) {
            Ok(true) => {
                self.journal_lines.store(0, Ordering::Relaxed);
                let path = path.to_path_buf();
                in_background(move || {
                    if let Err(e) = state::merge(&path) {
                        tracing::error!(error = %e, "cannot merge the state file's journal");
                    }
                });
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot rotate the state file's journal"),
        }
    }

    /// Writes `--state-file` whole now (at shutdown, after a damaged file
    /// was set aside, when the journal overflowed); the journals are then
    /// redundant and removed.
    pub fn save_state(&self) -> std::io::Result<()> {
        let s = self.settings.load();
        let Some(path) = &s.state_file else {
            return Ok(());
        };
        let _ = self.bans.take_changes();
        let (bans, offences) = self.bans.export();
        state::save(path, bans, offences)?;
        self.journal_lines.store(0, Ordering::Relaxed);
        let known = self.known.export(unix_now(), s.known_max as usize);
        state::save_known(path, &known)
    }

    /// Writes the known clients beside the state file, in a background
    /// thread (the list is copied a shard at a time).
    pub(super) fn save_known(&self, path: &std::path::Path) {
        let known = self
            .known
            .export(unix_now(), self.settings.load().known_max as usize);
        let path = path.to_path_buf();
        in_background(move || {
            if let Err(e) = state::save_known(&path, &known) {
                tracing::error!(error = %e, "cannot write the known clients");
            }
        });
    }

    /// Reads `--state-file` back at start; a damaged file is reported and
    /// set aside, never fatal.
    pub fn restore_state(&self) {
        let s = self.settings.load();
        let Some(path) = &s.state_file else {
            return;
        };
        let limits = state::Limits {
            prefix_v4: s.prefix_v4,
            prefix_v6: s.prefix_v6,
        };
        // Known clients first: a ban restored below forgets its client.
        let max = usize::try_from(s.known_max).unwrap_or(usize::MAX);
        match state::load_known(path, unix_now(), s.known_forget_secs, max) {
            Ok(r) => {
                for (ip, last) in &r.clients {
                    self.known.make_known(*ip, *last);
                }
                if !r.clients.is_empty() || r.dropped > 0 {
                    tracing::info!(
                        known = r.clients.len(),
                        dropped = r.dropped,
                        "known clients restored"
                    );
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
        match state::load(path, limits) {
            Ok(None) => {}
            Ok(Some(r)) => {
                let (n, m) = (r.bans.len(), r.offences.len());
                for why in r.invalid.iter().take(10) {
                    tracing::warn!(file = %path.display(), "state file entry dropped: {why}");
                }
                if let Some(aside) = &r.set_aside {
                    tracing::warn!("{aside}");
                    // What was valid is written back at the next tick.
                    self.snapshot_due.store(true, Ordering::Relaxed);
                }
                for (net, reason, since, remaining, hits) in r.bans {
                    let prefix =
                        is_host(&net).then(|| prefix_of(net.addr(), s.prefix_v4, s.prefix_v6));
                    self.known.forget(&net);
                    self.bans
                        .restore(net, reason, since, remaining, hits, prefix, false);
                }
                for (net, count, remaining) in r.offences {
                    self.bans.restore_offence(net, count, remaining);
                }
                self.metrics.guard.bans_active.set(self.bans.len() as i64);
                tracing::info!(
                    bans = n,
                    repeat_counts = m,
                    expired = r.dropped,
                    invalid = r.invalid.len(),
                    file = %path.display(),
                    "state restored"
                );
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// Renders and writes the ban file in a background thread, from a
    /// copy of the bans taken a thousand per lock.
    pub(super) fn write_ban_file(&self) {
        let s = self.settings.load_full();
        let Some(path) = s.ban_file.clone() else {
            return;
        };
        let bans = self.bans.for_firewall();
        in_background(move || {
            let text = nft::render(&bans, &s.ports, &s.udp_ports);
            if let Err(e) = nft::write_atomically(&path, &text) {
                tracing::error!(error = %e, "cannot write the ban file");
            }
        });
    }
}
