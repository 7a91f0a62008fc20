//! Event time: readability, idleness, watermarks, and closing what they
//! pass.

use super::*;

impl Engine {
    /// What the shell knows of partition `p`'s input, before each tick.
    /// Only the broker can make a partition idle, by having nothing for it:
    /// a partition [`Readable::Behind`] (records wait to be read) stops
    /// being idle at once (its watermark stays where it got to), and one
    /// the shell has [`Readable::Paused`] (a flush waiting for
    /// acknowledgements, a full producer queue, a restore) keeps whatever
    /// idleness it had: its lag is unknown while nothing is fetched, so
    /// the wall clock that passes meanwhile does not make it idle. Otherwise
    /// the pod's own pauses would make partitions idle, their watermarks
    /// jump to the others', and their in-order backlog turn late.
    pub fn set_readable(&mut self, p: Partition, r: Readable) {
        if let Some(part) = self.parts.get_mut(&p) {
            part.readable = r;
            if r == Readable::Behind {
                part.idle = false;
            }
        }
    }

    /// Wall-clock progress for one partition: marks it idle after
    /// `idle_timeout_ms` without records and with nothing to read, then
    /// lets idle partitions follow the combined watermark of the active
    /// ones.
    pub fn on_tick(&mut self, p: Partition, wall_ms: i64, out: &mut Vec<Effect>) {
        debug_assert!(self.session_limit.is_none(), "a cache limit needs a reader");
        let timeout = self.cfg.idle_timeout_ms;
        if let Some(part) = self.parts.get_mut(&p) {
            part.mark_idle(wall_ms, timeout);
        }
        self.release_idle(out, &mut InMemory);
    }

    /// [`Engine::on_tick`] for every partition held.
    pub fn tick(&mut self, wall_ms: i64, out: &mut Vec<Effect>) {
        debug_assert!(self.session_limit.is_none(), "a cache limit needs a reader");
        self.tick_in(wall_ms, out, &mut InMemory);
    }

    /// [`Engine::tick`], reading sessions a released watermark closes
    /// through `reader`.
    pub fn tick_in(&mut self, wall_ms: i64, out: &mut Vec<Effect>, reader: &mut dyn StateReader) {
        let timeout = self.cfg.idle_timeout_ms;
        for part in self.parts.values_mut() {
            part.mark_idle(wall_ms, timeout);
        }
        self.release_idle(out, reader);
    }

    /// The minimum watermark over partitions that are not idle; idle
    /// partitions hold nothing back. `None` while an active partition has
    /// no watermark yet, or when every partition is idle.
    pub fn combined_watermark(&self) -> Option<i64> {
        let mut active = self.parts.values().filter(|p| !p.idle).peekable();
        active.peek()?;
        let mut min: Option<i64> = None;
        for part in active {
            let wm = part.watermark?;
            min = Some(min.map_or(wm, |m: i64| m.min(wm)));
        }
        min
    }

    pub(super) fn release_idle(&mut self, out: &mut Vec<Effect>, reader: &mut dyn StateReader) {
        // With every partition idle, the lowest watermark any of them
        // reached: a partition that never had a record must still vouch
        // for what the others closed (otherwise the view, which needs
        // every partition's watermark, never serves a final once the
        // input runs dry before the empty partition turned idle).
        let Some(combined) = self
            .combined_watermark()
            .or_else(|| self.parts.values().filter_map(|p| p.watermark).min())
        else {
            return;
        };
        let idle: Vec<Partition> = self
            .parts
            .iter()
            .filter(|(_, s)| s.idle && s.watermark.is_none_or(|w| w < combined))
            .map(|(p, _)| *p)
            .collect();
        for p in idle {
            if let Some(part) = self.parts.get_mut(&p) {
                part.watermark = Some(combined);
                part.meta_dirty = true;
            }
            self.advance(p, out, reader);
        }
    }

    /// End of input for a partition (bounded replay): the watermark becomes
    /// +∞ and every window closes.
    pub fn finish(&mut self, p: Partition, out: &mut Vec<Effect>) {
        self.finish_in(p, out, &mut InMemory);
    }

    /// [`Engine::finish`], reading the sessions it closes through `reader`.
    pub fn finish_in(&mut self, p: Partition, out: &mut Vec<Effect>, reader: &mut dyn StateReader) {
        if let Some(part) = self.parts.get_mut(&p) {
            part.watermark = Some(i64::MAX);
            part.meta_dirty = true;
        }
        self.advance(p, out, reader);
    }

    /// Closes every window the partition's watermark has passed (emitting
    /// its final result once) and expires dedup entries.
    pub(super) fn advance(
        &mut self,
        p: Partition,
        out: &mut Vec<Effect>,
        reader: &mut dyn StateReader,
    ) {
        let Some(part) = self.parts.get_mut(&p) else {
            return;
        };
        let Some(wm) = part.watermark else {
            return;
        };
        part.meta_dirty = true;
        if self.session_limit.is_some() {
            // Sessions not in memory that this watermark closes: from the
            // store's close-time index, into memory and the closing set,
            // so they close below in the same order as held ones.
            let grace = self.cfg.grace_ms;
            for (ix, spec) in self.cfg.windows.iter().enumerate() {
                let WindowKind::Session { gap_ms } = spec.kind else {
                    continue;
                };
                let bound = wm.saturating_sub(gap_ms).saturating_sub(grace);
                let scan = part.session_scan[ix];
                if scan.scanned.is_some_and(|s| s >= bound) || scan.next.is_some_and(|n| n > bound)
                {
                    continue;
                }
                let spec_ix = ix as u16;
                let (customers, next) = reader.sessions_ending(p, spec_ix, scan.scanned, bound);
                part.session_scan[ix].scanned = Some(bound);
                part.session_scan[ix].next = Some(next.unwrap_or(i64::MAX));
                for customer in customers {
                    let skey = (spec_ix, customer);
                    if part.sessions.contains_key(&skey) {
                        continue;
                    }
                    self.cache.sessions.misses += 1;
                    part.read_sessions(p, skey, gap_ms + grace, reader);
                }
            }
        }
        while part.closing.first().is_some_and(|(c, _)| *c <= wm) {
            let Some((close_at, key)) = part.closing.pop_first() else {
                break;
            };
            let spec = &self.cfg.windows[usize::from(key.spec)];
            let row = if matches!(spec.kind, WindowKind::Session { .. }) {
                let skey = (key.spec, key.group.clone());
                let Some(set) = part.sessions.get_mut(&skey) else {
                    continue;
                };
                let Some(s) = set.sessions.iter_mut().find(|s| s.start == key.start) else {
                    continue;
                };
                s.closed = true;
                part.open_sessions = part.open_sessions.saturating_sub(1);
                let row = session_row(s);
                let at = row.end.saturating_add(self.cfg.window_retention_ms);
                part.expiring.insert((at, key.clone()));
                part.expiry_new.push((key.clone(), at));
                part.sessions_touched.insert(skey, false);
                part.pending_purge
                    .push(Purge::Session(close_at, key.clone()));
                row
            } else {
                let Some(row) = part.windows.get_mut(&key) else {
                    continue;
                };
                row.closed = true;
                let at = row.end.saturating_add(self.cfg.window_retention_ms);
                part.expiring.insert((at, key.clone()));
                part.expiry_new.push((key.clone(), at));
                part.touched.insert(key.clone(), false);
                part.pending_purge
                    .push(Purge::Window(close_at, key.clone()));
                row.clone()
            };
            out.push(Effect::Window(WindowUpdate {
                partition: p,
                spec_name: spec.name.clone(),
                kind: spec.kind,
                by: spec.by,
                key,
                row,
            }));
        }
        while part.dedup_expiry.first().is_some_and(|(e, _)| *e <= wm) {
            let Some((expire, id)) = part.dedup_expiry.pop_first() else {
                break;
            };
            // Kept until the watermark that expired it is durable.
            part.pending_purge.push(Purge::Dedup(expire, id));
        }
    }
}
