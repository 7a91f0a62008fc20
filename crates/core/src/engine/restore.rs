//! Rebuilding a partition from stored rows.

use super::*;

impl Engine {
    /// Rebuilds a partition from stored rows, replacing what was held. The
    /// rows may come from any durable prefix of flushes. Finals of closed
    /// rows and pending retractions are emitted again: they may not have
    /// reached downstream before a crash, and both are idempotent there.
    pub fn restore(
        &mut self,
        p: Partition,
        rows: impl IntoIterator<Item = StateRow>,
        wall_ms: i64,
        out: &mut Vec<Effect>,
    ) {
        debug_assert!(self.session_limit.is_none(), "a cache limit needs a reader");
        self.restore_in(p, rows, wall_ms, out, &mut InMemory);
    }

    /// [`Engine::restore`], with a reader for what the restored watermark
    /// closes among the rows left in the store. Rows that
    /// [`Engine::restore_keeps`] refuses are passed over (the shell may
    /// leave them out).
    pub fn restore_in(
        &mut self,
        p: Partition,
        rows: impl IntoIterator<Item = StateRow>,
        wall_ms: i64,
        out: &mut Vec<Effect>,
        reader: &mut dyn StateReader,
    ) {
        let mut part = Part::new(wall_ms, self.cfg.hash_seed, self.cfg.windows.len());
        part.meta_dirty = false;
        let horizon = self.cfg.dedup_horizon_ms;
        let mut members: Vec<(WindowKey, u64, Vec<u64>)> = Vec::new();
        let mut refinal: Vec<WindowKey> = Vec::new();
        for row in rows {
            match row {
                StateRow::Members(key, n, m) => members.push((key, n, m)),
                StateRow::Expiry(key, at) => {
                    if self.cfg.windows.get(usize::from(key.spec)).is_some() {
                        part.expiring.insert((at, key));
                    }
                }
                StateRow::Meta(m) => {
                    part.next_offset = m.next_offset;
                    part.max_event_ms = m.max_event_ms;
                    part.watermark = m.watermark;
                }
                StateRow::Dedup(id, d) => {
                    // With a cache limit the store holds them, and their
                    // expiry index too.
                    if self.dedup_limit.is_none() {
                        part.restore_dedup(id, d, horizon);
                    }
                }
                StateRow::DedupSegment(seq, n, seg) => {
                    part.dedup_segments.insert((seg.expire_ms, seq, n));
                    // The store's copy has no entries (they are rows of
                    // their own there); a changelog's copy has them.
                    if self.dedup_limit.is_none() {
                        for (id, d) in seg.entries {
                            part.restore_dedup(id, d, horizon);
                        }
                    }
                }
                StateRow::Window(key, row) => {
                    if self.cfg.windows.get(usize::from(key.spec)).is_none() {
                        continue;
                    }
                    let close_at = self.close_at(key.spec, row.end);
                    if row.closed {
                        part.pending_purge
                            .push(Purge::Window(close_at, key.clone()));
                        // Emitted once its customers have joined (below).
                        refinal.push(key.clone());
                    } else {
                        part.closing.insert((close_at, key.clone()));
                    }
                    part.windows.insert(key, row);
                }
                StateRow::Sessions(spec, customer, set) => {
                    if self.cfg.windows.get(usize::from(spec)).is_none() {
                        continue;
                    }
                    part.open_sessions += set.sessions.iter().filter(|s| !s.closed).count();
                    if self.session_limit.is_some() && !needs_memory(&set) {
                        // Left in the store, with its close-time index.
                        continue;
                    }
                    for start in &set.retracted {
                        let key = WindowKey {
                            spec,
                            group: customer.clone(),
                            start: *start,
                        };
                        out.push(Effect::Retracted {
                            partition: p,
                            spec_name: self.spec(spec).name.clone(),
                            key: key.clone(),
                        });
                        part.pending_purge.push(Purge::Retraction(0, key));
                    }
                    for s in &set.sessions {
                        let key = WindowKey {
                            spec,
                            group: customer.clone(),
                            start: s.start,
                        };
                        let close_at = self.close_at(spec, s.last);
                        if s.closed {
                            part.pending_purge
                                .push(Purge::Session(close_at, key.clone()));
                            out.push(self.update(p, &key, session_row(s)));
                        } else {
                            part.closing.insert((close_at, key));
                        }
                    }
                    part.sessions.insert((spec, customer), set);
                }
            }
        }
        // Rows come in any order: chunks join their windows at the end.
        members.sort_by_key(|(_, n, _)| *n);
        for (key, n, m) in members {
            match part.windows.get_mut(&key) {
                Some(row) => {
                    for h in m {
                        row.agg.customers.insert(h);
                    }
                    part.chunks.entry(key).or_default().push(n);
                }
                None => part.orphan_chunks.push((key, n)),
            }
        }
        for key in refinal {
            if let Some(row) = part.windows.get(&key) {
                out.push(self.update(p, &key, row.clone()));
            }
        }
        part.durable_wm = part.watermark;
        self.parts.insert(p, part);
        // Anything the restored watermark already passed closes now.
        self.advance(p, out, reader);
    }
}
