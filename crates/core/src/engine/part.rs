//! One input partition's state, and the helpers that read it.

use super::*;

impl Part {
    /// `specs`: how many window definitions (one close-time index scan
    /// each).
    pub(super) fn new(wall_ms: i64, seed: u64, specs: usize) -> Self {
        let h = || Seeded::with_seed(seed);
        Part {
            last_active_wall: wall_ms,
            meta_dirty: true,
            windows: HashMap::with_hasher(h()),
            sessions: HashMap::with_hasher(h()),
            dedup: HashMap::with_hasher(h()),
            touched: HashMap::with_hasher(h()),
            new_members: HashMap::with_hasher(h()),
            chunks: HashMap::with_hasher(h()),
            sessions_touched: HashMap::with_hasher(h()),
            dedup_touched: HashSet::with_hasher(h()),
            session_scan: vec![SessionScan::default(); specs],
            ..Part::default()
        }
    }

    pub(super) fn meta(&self) -> PartitionMeta {
        PartitionMeta {
            next_offset: self.next_offset,
            max_event_ms: self.max_event_ms,
            watermark: self.watermark,
        }
    }

    pub(super) fn status(&self) -> PartitionStatus {
        PartitionStatus {
            next_offset: self.next_offset,
            watermark: self.watermark,
            idle: self.idle,
        }
    }

    /// Idle: no record for `timeout` of wall time, and nothing to read.
    pub(super) fn mark_idle(&mut self, wall_ms: i64, timeout: i64) {
        if !self.idle
            && self.readable == Readable::CaughtUp
            && wall_ms - self.last_active_wall >= timeout
        {
            self.idle = true;
        }
    }

    /// A restored dedup entry. Of two for one id (a segment and a row,
    /// or two segments: the id seen again after its first entry
    /// expired) the later one wins, whatever order they come in.
    pub(super) fn restore_dedup(&mut self, id: String, d: DedupRow, horizon: i64) {
        if let Some(old) = self.dedup.get(&id) {
            if old.offset >= d.offset {
                return;
            }
            self.dedup_expiry
                .remove(&(old.event_ms + horizon, id.clone()));
        }
        self.dedup_expiry.insert((d.event_ms + horizon, id.clone()));
        self.dedup.insert(id, d);
    }

    pub(super) fn is_closed_at(&self, close_at: i64) -> bool {
        matches!(self.watermark, Some(wm) if close_at <= wm)
    }

    /// Reads a session set not in memory from the store into memory, its
    /// open sessions into the closing set (`gap_grace`: the definition's
    /// gap plus the grace). Nothing stored: nothing happens.
    pub(super) fn read_sessions(
        &mut self,
        p: Partition,
        skey: (u16, String),
        gap_grace: i64,
        reader: &mut dyn StateReader,
    ) {
        let Some(set) = reader.sessions(p, skey.0, &skey.1) else {
            return;
        };
        for s in set.sessions.iter().filter(|s| !s.closed) {
            let key = WindowKey {
                spec: skey.0,
                group: skey.1.clone(),
                start: s.start,
            };
            self.closing.insert((s.last + gap_grace, key));
        }
        self.sessions.insert(skey, set);
    }
}

/// A session set that must stay in memory until its purge: it has a
/// closed session or a retraction waiting for a durable flush.
pub(super) fn needs_memory(set: &SessionSet) -> bool {
    !set.retracted.is_empty() || set.sessions.iter().any(|s| s.closed)
}

pub(super) fn session_row(s: &Session) -> WindowRow {
    WindowRow {
        end: s.last,
        agg: s.agg.clone(),
        offset: s.offset,
        closed: s.closed,
    }
}
