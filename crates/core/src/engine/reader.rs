//! Reading state the engine does not hold in memory, and the caches'
//! counters.

use super::*;

/// What the shell knows of a partition's input ([`Engine::set_readable`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Readable {
    /// Nothing left to read (lag zero) and fetching: may turn idle. Also
    /// the state of an engine no shell reports to (replay, tests).
    #[default]
    CaughtUp,
    /// Records wait to be read: not idle.
    Behind,
    /// Paused by the shell: the lag is unknown; idleness does not change.
    Paused,
}

/// Dedup entries the engine does not hold in memory, read on demand.
///
/// Why: with a bounded cache ([`Engine::set_dedup_cache`]) the durable
/// copy of every flushed entry (the shell's RocksDB) is the source of
/// truth, and the engine keeps only the entries it may still need soon
/// or has not yet made durable. A reader is a value interface: the core
/// does no IO, and what it decides depends only on what the reader
/// returns. The entry returned must be the durable one (the engine never
/// evicts an entry whose latest version is not yet durable, so the
/// durable version is the current one).
pub trait StateReader {
    fn dedup(&mut self, p: Partition, order_id: &str) -> Option<DedupRow>;
    /// The ids of the stored dedup entries of partition `p` whose event
    /// time is in `(after, upto_event_ms]` (`after` `None`: from the
    /// start), from an index the store keeps ordered by event time. It
    /// may return ids whose entry has since changed or gone (the engine
    /// checks each).
    fn dedup_expiring(
        &mut self,
        p: Partition,
        after: Option<i64>,
        upto_event_ms: i64,
    ) -> Vec<String>;
    /// The index entries up to `upto_event_ms` are no longer needed: the
    /// deletes of the entries they named are durable. Why not forget on
    /// reading: a crash before those deletes are durable would leave the
    /// rows with no index entry, in the store for good.
    fn forget_dedup_expiring(&mut self, p: Partition, upto_event_ms: i64);
    /// The stored sessions of one customer for session definition `spec`:
    /// the durable version, read when the set is not in the cache
    /// ([`Engine::set_session_cache`]).
    fn sessions(&mut self, p: Partition, spec: u16, customer: &str) -> Option<SessionSet>;
    /// The close-time index, kept by the store beside the rows: the
    /// customers with a stored *open* session of definition `spec` whose
    /// last event time is in `(after, upto_last_ms]` (`after` `None`: from
    /// the start), ascending, and the last event time of the first entry
    /// beyond `upto_last_ms`, if any. Entries may be stale (the session
    /// has since grown, closed or gone): the engine checks each against
    /// the set. Nothing is forgotten: a scan may be repeated.
    fn sessions_ending(
        &mut self,
        p: Partition,
        spec: u16,
        after: Option<i64>,
        upto_last_ms: i64,
    ) -> (Vec<String>, Option<i64>);
    /// The index entries of `spec` up to `upto_last_ms` are no longer
    /// needed: every session they name is closed in the durable state.
    fn forget_sessions_ending(&mut self, p: Partition, spec: u16, upto_last_ms: i64);
}

/// Every entry in memory: nothing to read (the engine's default, with no
/// cache limit; replay and tests).
pub struct InMemory;

impl StateReader for InMemory {
    fn dedup(&mut self, _p: Partition, _order_id: &str) -> Option<DedupRow> {
        None
    }

    fn dedup_expiring(
        &mut self,
        _p: Partition,
        _after: Option<i64>,
        _upto_event_ms: i64,
    ) -> Vec<String> {
        Vec::new()
    }

    fn forget_dedup_expiring(&mut self, _p: Partition, _upto_event_ms: i64) {}

    fn sessions(&mut self, _p: Partition, _spec: u16, _customer: &str) -> Option<SessionSet> {
        None
    }

    fn sessions_ending(
        &mut self,
        _p: Partition,
        _spec: u16,
        _after: Option<i64>,
        _upto_last_ms: i64,
    ) -> (Vec<String>, Option<i64>) {
        (Vec::new(), None)
    }

    fn forget_sessions_ending(&mut self, _p: Partition, _spec: u16, _upto_last_ms: i64) {}
}

/// One cache's counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowCacheStats {
    /// Lookups answered from memory.
    pub hits: u64,
    /// Lookups that went to the reader.
    pub misses: u64,
    /// Entries dropped from memory (clean: durable).
    pub evicted: u64,
    /// Entries held now.
    pub entries: u64,
}

/// The state caches' counters: dedup entries and session sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub dedup: RowCacheStats,
    pub sessions: RowCacheStats,
}
