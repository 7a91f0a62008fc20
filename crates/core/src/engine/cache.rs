//! Bounded state caches: dropping clean rows beyond the limits.

use super::*;

impl Engine {
    /// Beyond the session cache limit, drops every clean session set: not
    /// changed since the last flush, not in a flush not yet durable, and
    /// with nothing awaiting a purge (a closed session, a retraction), so
    /// the reader returns it as it is. Their open sessions leave the
    /// closing set; the store's close-time index has them, and the scan
    /// hint comes down to the earliest of them.
    pub(super) fn evict_sessions(&mut self) {
        let Some(limit) = self.session_limit else {
            return;
        };
        let held: usize = self.parts.values().map(|p| p.sessions.len()).sum();
        if held <= limit {
            return;
        }
        let grace = self.cfg.grace_ms;
        let windows = &self.cfg.windows;
        for part in self.parts.values_mut() {
            let mut keep: FastSet<&(u16, String)> = FastSet::with_hasher(Seeded::with_seed(0));
            keep.extend(part.sessions_touched.keys());
            for (_, sets) in &part.sessions_inflight {
                keep.extend(sets.iter());
            }
            let mut gone: Vec<(u16, String)> = Vec::new();
            for (skey, set) in &part.sessions {
                if !keep.contains(skey) && !needs_memory(set) {
                    gone.push(skey.clone());
                }
            }
            drop(keep);
            for skey in gone {
                let Some(set) = part.sessions.remove(&skey) else {
                    continue;
                };
                let WindowKind::Session { gap_ms } = windows[usize::from(skey.0)].kind else {
                    continue;
                };
                let (spec, group) = skey;
                let mut key = WindowKey {
                    spec,
                    group,
                    start: 0,
                };
                for s in set.sessions.iter().filter(|s| !s.closed) {
                    key.start = s.start;
                    part.closing.remove(&(s.last + gap_ms + grace, key.clone()));
                    let scan = &mut part.session_scan[usize::from(spec)];
                    scan.next = scan.next.map(|n| n.min(s.last));
                }
                self.cache.sessions.evicted += 1;
            }
        }
    }

    /// Beyond the cache limit, drops every clean dedup entry: neither
    /// changed since the last flush nor in a flush not yet durable, so
    /// the reader returns it as it is. Dropping all of them at once (not
    /// the least recently used) because an entry is read again only for a
    /// duplicate, which is rare, and a sweep costs one pass a limit's worth.
    pub(super) fn evict_dedup(&mut self) {
        let Some(limit) = self.dedup_limit else {
            return;
        };
        let held: usize = self.parts.values().map(|p| p.dedup.len()).sum();
        if held <= limit {
            return;
        }
        for part in self.parts.values_mut() {
            let mut keep: FastSet<&str> = FastSet::with_hasher(Seeded::with_seed(0));
            keep.extend(part.dedup_touched.iter().map(String::as_str));
            for (_, ids) in &part.dedup_inflight {
                keep.extend(ids.iter().map(String::as_str));
            }
            let before = part.dedup.len();
            part.dedup.retain(|id, _| keep.contains(id.as_str()));
            self.cache.dedup.evicted += (before - part.dedup.len()) as u64;
        }
    }
}
