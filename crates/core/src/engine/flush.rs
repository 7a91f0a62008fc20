//! The durability protocol: announcing open results, draining a flush,
//! and purging once it is durable.

use super::*;

impl Engine {
    /// The current result (`final: false`) of every open window and
    /// session that changed since it was last announced or flushed, to
    /// `effects`, without draining anything for the store: the next
    /// [`Engine::flush`] still writes their rows, and emits only what
    /// changed after this.
    ///
    /// Why: a pod emits open results when it seals a flush, and it seals
    /// one only when the last is durable; on a busy broker that cycle
    /// (outputs, then the changelog group by group, then the store) takes
    /// well over the flush interval, and every open result waited for it
    /// (an end-to-end p99 of 384–498 ms at half the maximum load).
    /// Announcing on the interval while a flush is in flight decouples
    /// how fresh results are from how long durability takes, as Kafka
    /// Streams' record cache is flushed downstream on its commit interval
    /// whatever its changelog is doing. Results are upserts keyed by
    /// window, so an extra intermediate result changes no final figure.
    pub fn announce(&mut self, effects: &mut Vec<Effect>) {
        let parts: Vec<Partition> = self.parts.keys().copied().collect();
        for p in parts {
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            let mut keys: Vec<WindowKey> = unannounced(&mut part.touched);
            keys.sort_unstable();
            let mut skeys: Vec<(u16, String)> = unannounced(&mut part.sessions_touched);
            skeys.sort_unstable();
            let part = &self.parts[&p];
            for key in keys {
                if let Some(row) = part.windows.get(&key).filter(|r| !r.closed) {
                    effects.push(self.update(p, &key, row.clone()));
                }
            }
            for skey in skeys {
                if let Some(set) = part.sessions.get(&skey) {
                    self.open_sessions(p, &skey, set, effects);
                }
            }
        }
    }

    /// The current result of every open session of one customer's set.
    pub(super) fn open_sessions(
        &self,
        p: Partition,
        skey: &(u16, String),
        set: &SessionSet,
        effects: &mut Vec<Effect>,
    ) {
        for s in set.sessions.iter().filter(|s| !s.closed) {
            let key = WindowKey {
                spec: skey.0,
                group: skey.1.clone(),
                start: s.start,
            };
            effects.push(self.update(p, &key, session_row(s)));
        }
    }

    /// Drains everything since the last flush: updates of open windows that
    /// changed since they were last announced (`final: false`) go to `effects`; every changed row, delete
    /// and partition meta goes to `changes`, meta last. Make them durable,
    /// then call [`Engine::on_durable`] with the returned id.
    pub fn flush(&mut self, effects: &mut Vec<Effect>, changes: &mut Vec<StateChange>) -> FlushId {
        self.flush_seq += 1;
        let horizon = self.cfg.dedup_horizon_ms;
        let parts: Vec<Partition> = self.parts.keys().copied().collect();
        for p in parts {
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            let mut touched: Vec<(WindowKey, bool)> = part.touched.drain().collect();
            touched.sort_unstable();
            let mut stouched: Vec<((u16, String), bool)> = part.sessions_touched.drain().collect();
            stouched.sort_unstable();
            if self.session_limit.is_some() && !stouched.is_empty() {
                part.sessions_inflight.push_back((
                    self.flush_seq,
                    stouched.iter().map(|(k, _)| k.clone()).collect(),
                ));
            }
            let mut ids: Vec<String> = part.dedup_touched.drain().collect();
            ids.sort();
            if self.dedup_limit.is_some() && !ids.is_empty() {
                part.dedup_inflight.push_back((self.flush_seq, ids.clone()));
            }
            let mut new_members = std::mem::take(&mut part.new_members);
            let mut chunks = std::mem::take(&mut part.chunks);
            for (key, n) in std::mem::take(&mut part.orphan_chunks) {
                changes.push(StateChange::Delete(p, RowKey::Members(key, n)));
            }
            let part = &self.parts[&p];
            for (key, announced) in touched {
                match part.windows.get(&key) {
                    Some(row) => {
                        if let Some(mut members) = new_members.remove(&key) {
                            members.sort_unstable();
                            let list = chunks.entry(key.clone()).or_default();
                            let n = list.last().map_or(0, |n| n + 1);
                            list.push(n);
                            changes.push(StateChange::Put(
                                p,
                                StateRow::Members(key.clone(), n, members),
                            ));
                        }
                        if !row.closed && !announced {
                            effects.push(self.update(p, &key, row.clone()));
                        }
                        let stored = WindowRow {
                            end: row.end,
                            agg: row.agg.without_customers(),
                            offset: row.offset,
                            closed: row.closed,
                        };
                        changes.push(StateChange::Put(p, StateRow::Window(key, stored)));
                    }
                    None => {
                        let gone = chunks.remove(&key).unwrap_or_default();
                        changes.push(StateChange::Delete(p, RowKey::Window(key.clone())));
                        for n in gone {
                            changes.push(StateChange::Delete(p, RowKey::Members(key.clone(), n)));
                        }
                    }
                }
            }
            for (skey, announced) in stouched {
                match part.sessions.get(&skey) {
                    Some(set) if !set.is_empty() => {
                        if !announced {
                            self.open_sessions(p, &skey, set, effects);
                        }
                        let (spec, customer) = skey;
                        changes.push(StateChange::Put(
                            p,
                            StateRow::Sessions(spec, customer, set.clone()),
                        ));
                    }
                    _ => changes.push(StateChange::Delete(p, RowKey::Sessions(skey.0, skey.1))),
                }
            }
            let mut segments: Vec<DedupSegment> = Vec::new();
            let mut bytes = SEGMENT_BYTES;
            for id in ids {
                match part.dedup.get(&id) {
                    Some(d) => {
                        if bytes >= SEGMENT_BYTES {
                            bytes = 0;
                            segments.push(DedupSegment {
                                expire_ms: i64::MIN,
                                entries: Vec::new(),
                            });
                        }
                        bytes += id.len();
                        if let Some(seg) = segments.last_mut() {
                            seg.expire_ms = seg.expire_ms.max(d.event_ms.saturating_add(horizon));
                            seg.entries.push((id, *d));
                        }
                    }
                    None => changes.push(StateChange::Delete(p, RowKey::Dedup(id))),
                }
            }
            let seq = self.flush_seq;
            let Some(part) = self.parts.get_mut(&p) else {
                continue;
            };
            // A new segment's key may be an old one's: a pod that died
            // after a segment was acknowledged and before its partition
            // meta was resumes below that segment's offset, and may seal a
            // flush at the same offset again. The new value replaces the
            // old, so the old one's schedule goes, and a tombstone due for
            // it would delete the new one (the tombstones go first anyway).
            let here = part.next_offset;
            let fresh = segments.len() as u32;
            if fresh > 0 {
                part.dedup_segments
                    .retain(|&(_, s, n)| !(s == here && n < fresh));
                part.segments_expired
                    .retain(|&(s, n)| !(s == here && n < fresh));
            }
            for (at, n) in std::mem::take(&mut part.segments_expired) {
                changes.push(StateChange::Delete(p, RowKey::DedupSegment(at, n)));
            }
            for (n, seg) in segments.into_iter().enumerate() {
                let n = n as u32;
                part.dedup_segments.insert((seg.expire_ms, here, n));
                changes.push(StateChange::Put(p, StateRow::DedupSegment(here, n, seg)));
            }
            for (key, at) in std::mem::take(&mut part.expiry_new) {
                changes.push(StateChange::Put(p, StateRow::Expiry(key, at)));
            }
            for key in std::mem::take(&mut part.expired) {
                effects.push(Effect::Expired {
                    partition: p,
                    spec_name: self.cfg.windows[usize::from(key.spec)].name.clone(),
                    key: key.clone(),
                });
                changes.push(StateChange::Delete(p, RowKey::Expiry(key)));
            }
            part.chunks = chunks;
            if part.meta_dirty {
                part.meta_dirty = false;
                changes.push(StateChange::Put(p, StateRow::Meta(part.meta())));
            }
            part.flushed_wm.push_back((seq, part.watermark));
        }
        self.flush_seq
    }

    /// The flush `id` (and every earlier one) is durable: closed rows,
    /// retractions and expired dedup entries it covered can now be removed.
    /// Their deletes go out with the next flush.
    pub fn on_durable(&mut self, id: FlushId) {
        debug_assert!(self.dedup_limit.is_none(), "a cache limit needs a reader");
        self.on_durable_in(id, &mut InMemory);
    }

    /// [`Engine::on_durable`], reading dedup entries not in memory through
    /// `reader`; then evicts clean entries beyond the cache limit.
    pub fn on_durable_in(&mut self, id: FlushId, reader: &mut dyn StateReader) {
        let horizon = self.cfg.dedup_horizon_ms;
        let limited = self.dedup_limit.is_some();
        let sessions_limited = self.session_limit.is_some();
        for (&p, part) in self.parts.iter_mut() {
            while let Some((fid, wm)) = part.flushed_wm.front().copied() {
                if fid > id {
                    break;
                }
                part.flushed_wm.pop_front();
                if wm > part.durable_wm {
                    part.durable_wm = wm;
                }
            }
            let covered = |t: i64, w: Option<i64>| w.is_some_and(|w| t <= w);
            let durable_wm = part.durable_wm;
            while part
                .expiring
                .first()
                .is_some_and(|(at, _)| covered(*at, durable_wm))
            {
                if let Some((_, key)) = part.expiring.pop_first() {
                    part.expired.push(key);
                }
            }
            while let Some(&(at, seq, n)) = part.dedup_segments.first() {
                if !covered(at, durable_wm) {
                    break;
                }
                part.dedup_segments.pop_first();
                part.segments_expired.push((seq, n));
            }
            let pending = std::mem::take(&mut part.pending_purge);
            for item in pending {
                match item {
                    Purge::Window(t, key) if covered(t, durable_wm) => {
                        if part.windows.get(&key).is_some_and(|r| r.closed) {
                            part.windows.remove(&key);
                            part.touched.insert(key, false);
                        }
                    }
                    Purge::Session(t, key) if covered(t, durable_wm) => {
                        let skey = (key.spec, key.group.clone());
                        if let Some(set) = part.sessions.get_mut(&skey) {
                            set.sessions.retain(|s| !(s.closed && s.start == key.start));
                            // With a cache, an empty set stays until its
                            // delete is durable: absent would mean "read
                            // the store", which still has the old set.
                            if set.is_empty() && !sessions_limited {
                                part.sessions.remove(&skey);
                            }
                            part.sessions_touched.insert(skey, false);
                        }
                    }
                    Purge::Retraction(fid, key) if fid <= id => {
                        let skey = (key.spec, key.group.clone());
                        if let Some(set) = part.sessions.get_mut(&skey) {
                            set.retracted.retain(|s| *s != key.start);
                            if set.is_empty() && !sessions_limited {
                                part.sessions.remove(&skey);
                            }
                            part.sessions_touched.insert(skey, false);
                        }
                    }
                    Purge::Dedup(t, d) if covered(t, durable_wm) => {
                        if limited && !part.dedup.contains_key(&d) {
                            if let Some(row) = reader.dedup(p, &d) {
                                part.dedup.insert(d.clone(), row);
                            }
                        }
                        // The id may have been seen again since it expired.
                        let expired = part
                            .dedup
                            .get(&d)
                            .is_some_and(|r| covered(r.event_ms + horizon, durable_wm));
                        if expired {
                            part.dedup.remove(&d);
                            part.dedup_touched.insert(d);
                        }
                    }
                    other => part.pending_purge.push(other),
                }
            }
            while part
                .dedup_inflight
                .front()
                .is_some_and(|(fid, _)| *fid <= id)
            {
                part.dedup_inflight.pop_front();
            }
            while part
                .sessions_inflight
                .front()
                .is_some_and(|(fid, _)| *fid <= id)
            {
                part.sessions_inflight.pop_front();
            }
            // Close-time index entries a durable watermark covers name
            // sessions closed (or gone) in the durable state: the store
            // may drop them.
            if let (true, Some(w)) = (self.session_limit.is_some(), durable_wm) {
                for (ix, spec) in self.cfg.windows.iter().enumerate() {
                    let WindowKind::Session { gap_ms } = spec.kind else {
                        continue;
                    };
                    let upto = w.saturating_sub(gap_ms).saturating_sub(self.cfg.grace_ms);
                    let scan = &mut part.session_scan[ix];
                    if scan.forgotten.is_none_or(|f| upto > f) {
                        scan.forgotten = Some(upto);
                        reader.forget_sessions_ending(p, ix as u16, upto);
                    }
                }
            }
            // With a cache limit the expiry index is the store's: ask it
            // what a newly durable watermark expired, as the purges above
            // do for the in-memory index (same flush, same deletes).
            let due = durable_wm
                .filter(|_| limited)
                .map(|w| w.saturating_sub(horizon));
            while let Some((fid, upto)) = part.dedup_forget.front().copied() {
                if fid > id {
                    break;
                }
                part.dedup_forget.pop_front();
                reader.forget_dedup_expiring(p, upto);
            }
            if let Some(upto) = due.filter(|u| part.dedup_scanned.is_none_or(|s| *u > s)) {
                let after = part.dedup_scanned.replace(upto);
                part.dedup_forget.push_back((self.flush_seq + 1, upto));
                for d in reader.dedup_expiring(p, after, upto) {
                    if !part.dedup.contains_key(&d) {
                        match reader.dedup(p, &d) {
                            Some(row) => {
                                part.dedup.insert(d.clone(), row);
                            }
                            None => continue,
                        }
                    }
                    // The id may have been seen again since.
                    if part
                        .dedup
                        .get(&d)
                        .is_some_and(|r| covered(r.event_ms + horizon, durable_wm))
                    {
                        part.dedup.remove(&d);
                        part.dedup_touched.insert(d);
                    }
                }
            }
        }
        self.evict_dedup();
        self.evict_sessions();
    }
}
