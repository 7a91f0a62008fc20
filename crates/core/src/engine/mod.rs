//! The sans-IO state machine: records and ticks in, effects and state changes out.
//!
//! State is kept per input partition (a partition is the unit of state, time
//! and failover, as in Kafka Streams). For each partition the engine keeps a
//! watermark, the open windows and sessions, closed rows not yet known to be
//! durable, and the dedup entries.
//!
//! # Laws (each is a property test in `tests/core_laws.rs`)
//! - **Order within bounds.** If every event arrives while the partition's
//!   largest event time seen is at most `t + out_of_orderness`, no event is
//!   late and the final windows equal a batch computation over the events.
//! - **Replay is a no-op.** Re-feeding any already-applied record changes no
//!   row. Every row records the highest input offset folded into it.
//! - **Final once.** Each window emits `final: true` exactly once, and never
//!   changes after that.
//!
//! # Durability protocol
//! [`Engine::flush`] drains the effects and row changes of everything since
//! the previous flush and returns a [`FlushId`]. Once the shell has made that
//! flush durable it calls [`Engine::on_durable`]; only then are closed windows
//! and expired dedup entries removed (their deletes go out with the next
//! flush). So a store restored from any durable prefix of flushes never loses
//! a closed row before the watermark that closed it is durable too.
//!
//! # Files, one concern each
//! - `config`: [`CoreConfig`] and its validation.
//! - `rows`: state rows and their keys ([`StateRow`], [`RowKey`],
//!   [`StateChange`]).
//! - `effects`: what the shell is handed ([`Effect`], [`WindowUpdate`]).
//! - `reader`: state not held in memory ([`StateReader`]) and cache counters.
//! - `part`: one partition's state and its helpers.
//! - `record`: one input record: dedup, lateness, the fold into windows
//!   and sessions.
//! - `time`: readability, idleness, watermarks, closing.
//! - `flush`: announcing, draining a flush, purging once durable.
//! - `cache`: dropping clean rows beyond the cache limits.
//! - `restore`: rebuilding a partition from stored rows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::aggregate::{customer_hash, Aggregate};
use super::order::{
    enrich, parse_order_fields, EnrichedOrder, FieldSpan, FxTable, FxUpdate, Limits, Reason,
    Rejection, MICROS,
};
use super::window::{assign, GroupBy, WindowKind, WindowSpec};

pub type Partition = i32;
pub type Offset = i64;

/// Identifies one call of [`Engine::flush`]; increasing.
pub type FlushId = u64;

mod cache;
mod config;
mod effects;
mod flush;
mod part;
mod reader;
mod record;
mod restore;
mod rows;
mod time;

pub use config::*;
pub use effects::*;
use part::*;
pub use reader::*;
use record::*;
pub use rows::*;

/// What may leave the state, and when.
#[derive(Clone, Debug)]
enum Purge {
    /// A closed window: once a durable watermark covers its close.
    Window(i64, WindowKey),
    /// A closed session (key: spec, customer, start): likewise.
    Session(i64, WindowKey),
    /// A retracted session id: once the flush that carried the retraction is durable.
    Retraction(FlushId, WindowKey),
    /// An expired dedup entry: once a durable watermark covers its expiry.
    Dedup(i64, String),
}

/// The engine's maps: foldhash, seeded from [`CoreConfig::hash_seed`].
/// SipHash (std's default) was ~5 % of the pod thread's time.
type Seeded = foldhash::fast::FixedState;
type FastMap<K, V> = HashMap<K, V, Seeded>;
type FastSet<K> = HashSet<K, Seeded>;

#[derive(Default)]
struct Part {
    next_offset: Offset,
    max_event_ms: Option<i64>,
    watermark: Option<i64>,
    last_active_wall: i64,
    idle: bool,
    /// What the shell knows of the partition's input: only a partition
    /// caught up with the broker may turn idle.
    readable: Readable,
    windows: FastMap<WindowKey, WindowRow>,
    sessions: FastMap<(u16, String), SessionSet>,
    /// Open windows and sessions by close time.
    closing: BTreeSet<(i64, WindowKey)>,
    dedup: FastMap<String, DedupRow>,
    /// Live dedup entries by expiry time.
    dedup_expiry: BTreeSet<(i64, String)>,
    /// Windows changed since the last flush (their rows go with the
    /// next), each with whether its current result was announced
    /// ([`Engine::announce`]) since its last change.
    touched: FastMap<WindowKey, bool>,
    /// Customers each window gained since the last flush (its next chunk).
    new_members: FastMap<WindowKey, Vec<u64>>,
    /// The chunk numbers stored for each window, ascending.
    chunks: FastMap<WindowKey, Vec<u64>>,
    /// Stored chunks of windows that no longer exist (from a flush cut in
    /// half): deleted by the next flush.
    orphan_chunks: Vec<(WindowKey, u64)>,
    /// Session sets changed since the last flush, as `touched`.
    sessions_touched: FastMap<(u16, String), bool>,
    dedup_touched: FastSet<String>,
    /// Dedup entries written by flushes not yet durable (kept with a
    /// cache limit only): they may not be evicted before.
    dedup_inflight: VecDeque<(FlushId, Vec<String>)>,
    /// With a cache limit: the event time up to which the store was asked
    /// for expiring entries (the expiry index lives in the store then).
    dedup_scanned: Option<i64>,
    /// Index ranges read, each with the flush that carries the deletes
    /// they caused: forgotten once that flush is durable.
    dedup_forget: VecDeque<(FlushId, i64)>,
    /// The stored dedup segments: (expiry, seq, chunk).
    dedup_segments: BTreeSet<(i64, i64, u32)>,
    /// Segments expired under a durable watermark: tombstoned by the
    /// next flush.
    segments_expired: Vec<(i64, u32)>,
    /// Session sets written by flushes not yet durable (with a session
    /// cache limit only): they may not be evicted before.
    sessions_inflight: VecDeque<(FlushId, Vec<(u16, String)>)>,
    /// With a session cache limit, per window definition: how far the
    /// store's close-time index was read (sessions not in memory).
    session_scan: Vec<SessionScan>,
    /// Open sessions, held in memory or not (the open-windows figure).
    open_sessions: usize,
    meta_dirty: bool,
    pending_purge: Vec<Purge>,
    /// The watermark each flush carried, until that flush is durable.
    flushed_wm: VecDeque<(FlushId, Option<i64>)>,
    /// The highest watermark known to be durable.
    durable_wm: Option<i64>,
    /// Closed windows and sessions still served, by expiry time.
    expiring: BTreeSet<(i64, WindowKey)>,
    /// Expiry rows to write with the next flush.
    expiry_new: Vec<(WindowKey, i64)>,
    /// Expired under a durable watermark: tombstoned by the next flush.
    expired: Vec<WindowKey>,
}

/// How far the store's close-time index of one session definition was
/// read. Why a hint and not a scan per watermark step: the watermark
/// moves with almost every record, and a RocksDB iterator costs more than
/// the record. `next` bounds from below the last event time of every
/// open session the store holds beyond `scanned` that is not in memory:
/// the engine reads the index again only once a watermark reaches it.
#[derive(Clone, Copy, Debug, Default)]
struct SessionScan {
    /// Index entries up to here were read (`None`: none yet).
    scanned: Option<i64>,
    /// `None`: unknown (read at the next step).
    next: Option<i64>,
    /// Index entries up to here were forgotten (durably closed).
    forgotten: Option<i64>,
}

/// The state machine for all partitions a pod holds.
pub struct Engine {
    cfg: CoreConfig,
    fx: FxTable,
    parts: BTreeMap<Partition, Part>,
    flush_seq: FlushId,
    /// A window key reused by `on_record`, so lookups do not allocate.
    scratch: WindowKey,
    /// At most this many dedup entries in memory; `None`: all of them.
    dedup_limit: Option<usize>,
    /// At most this many session sets (a customer's sessions of one
    /// definition) in memory beyond the ones not yet durable or awaiting
    /// a purge; `None`: all of them.
    session_limit: Option<usize>,
    cache: CacheStats,
    /// The fields of the last record [`Engine::on_record_in`] read
    /// ([`crate::order::parse_order_fields`]), so the shell writes its
    /// enriched record without parsing it again.
    fields: Vec<FieldSpan>,
}

impl Engine {
    pub fn new(cfg: CoreConfig, fx: FxTable) -> Result<Engine, ConfigError> {
        cfg.validate()?;
        Ok(Engine {
            cfg,
            fx,
            parts: BTreeMap::new(),
            flush_seq: 0,
            scratch: WindowKey {
                spec: 0,
                group: String::new(),
                start: 0,
            },
            dedup_limit: None,
            session_limit: None,
            cache: CacheStats::default(),
            fields: Vec::new(),
        })
    }

    /// The top-level fields of the record the last [`Engine::on_record_in`]
    /// read, as ranges of its bytes (empty when it was rejected, came
    /// before the partition's next offset, or took the general parse).
    pub fn fields(&self) -> &[FieldSpan] {
        &self.fields
    }

    /// Holds at most `entries` dedup entries in memory (beyond the ones
    /// not yet durable), reading the others through the [`StateReader`]
    /// given to [`Engine::on_record_in`] and [`Engine::on_durable_in`].
    /// Restore then keeps none of them in memory. Without it, every entry
    /// stays in memory and no reader is needed.
    pub fn set_dedup_cache(&mut self, entries: usize) {
        self.dedup_limit = Some(entries);
    }

    /// Holds at most `sets` session sets in memory (beyond the ones not
    /// yet durable and the ones awaiting a purge), reading the others
    /// through the [`StateReader`] given to the `_in` methods, and closing
    /// the ones not in memory from the store's close-time index
    /// ([`StateReader::sessions_ending`]). A restore keeps only the sets
    /// with something to emit again (a closed session or a retraction).
    pub fn set_session_cache(&mut self, sets: usize) {
        self.session_limit = Some(sets);
    }

    /// Whether a restore keeps `row` in memory: with cache limits, dedup
    /// entries and session sets holding only open sessions stay in the
    /// store (the shell may skip them while reading; the engine skips
    /// them too).
    pub fn restore_keeps(&self, row: &StateRow) -> bool {
        match row {
            StateRow::Dedup(..) => self.dedup_limit.is_none(),
            StateRow::Sessions(_, _, set) => self.session_limit.is_none() || needs_memory(set),
            _ => true,
        }
    }

    /// Whether dedup entries are read through a [`StateReader`] (a cache
    /// limit is set): a restore then need not be given them.
    pub fn dedup_cached(&self) -> bool {
        self.dedup_limit.is_some()
    }

    /// The dedup cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        let mut c = self.cache;
        c.dedup.entries = self.parts.values().map(|p| p.dedup.len() as u64).sum();
        c.sessions.entries = self.parts.values().map(|p| p.sessions.len() as u64).sum();
        c
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    pub fn fx(&self) -> &FxTable {
        &self.fx
    }

    /// FX changes apply to records processed after them.
    pub fn fx_mut(&mut self) -> &mut FxTable {
        &mut self.fx
    }

    /// Applies one `fx-rates` record: a version set or removed. Returns
    /// whether it came late ([`FxTable::is_late`]): in force from a time at
    /// or before the largest event time any held partition has processed,
    /// so orders it would have applied to may already be converted at the
    /// version before. It applies from now on all the same; closed windows
    /// never change (a final is final), and the shell counts and logs it.
    pub fn apply_fx(&mut self, update: FxUpdate) -> bool {
        let max_event = self.parts.values().filter_map(|p| p.max_event_ms).max();
        let (currency, from_ms) = match update {
            FxUpdate::Set {
                currency, from_ms, ..
            }
            | FxUpdate::Remove { currency, from_ms } => (currency, from_ms),
        };
        let before = self.fx.version(currency, from_ms);
        self.fx.apply(update);
        before != self.fx.version(currency, from_ms) && FxTable::is_late(from_ms, max_event)
    }

    /// Starts a partition with empty state (no-op if already held).
    pub fn assign(&mut self, p: Partition, wall_ms: i64) {
        self.parts
            .entry(p)
            .or_insert_with(|| Part::new(wall_ms, self.cfg.hash_seed, self.cfg.windows.len()));
    }

    /// Drops a partition's state (after the shell flushed it).
    pub fn revoke(&mut self, p: Partition) {
        self.parts.remove(&p);
    }

    pub fn partitions(&self) -> impl Iterator<Item = (Partition, PartitionStatus)> + '_ {
        self.parts.iter().map(|(p, s)| (*p, s.status()))
    }

    pub fn status(&self, p: Partition) -> Option<PartitionStatus> {
        self.parts.get(&p).map(Part::status)
    }

    /// Number of open (not yet final) windows per kind name.
    pub fn open_windows(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for w in &self.cfg.windows {
            m.entry(w.kind.name()).or_insert(0);
        }
        let session_kind = WindowKind::Session { gap_ms: 1 }.name();
        for part in self.parts.values() {
            for (_, key) in &part.closing {
                let kind = self.spec(key.spec).kind.name();
                // Sessions are counted whether held or not (below).
                if kind != session_kind {
                    *m.entry(kind).or_insert(0) += 1;
                }
            }
            if let Some(n) = m.get_mut(session_kind) {
                *n += part.open_sessions;
            }
        }
        m
    }

    fn spec(&self, ix: u16) -> &WindowSpec {
        &self.cfg.windows[usize::from(ix)]
    }

    fn update(&self, p: Partition, key: &WindowKey, row: WindowRow) -> Effect {
        let spec = self.spec(key.spec);
        Effect::Window(WindowUpdate {
            partition: p,
            spec_name: spec.name.clone(),
            kind: spec.kind,
            by: spec.by,
            key: key.clone(),
            row,
        })
    }

    fn close_at(&self, spec: u16, end_or_last: i64) -> i64 {
        let grace = self.cfg.grace_ms;
        match self.spec(spec).kind {
            WindowKind::Session { gap_ms } => end_or_last + gap_ms + grace,
            _ => end_or_last + grace,
        }
    }

    /// Current result of every window and session held (open, and closed
    /// but not yet purged), sorted by partition and key.
    pub fn snapshot(&self) -> Vec<WindowUpdate> {
        let mut v = Vec::new();
        for (p, part) in &self.parts {
            for (key, row) in &part.windows {
                if let Effect::Window(w) = self.update(*p, key, row.clone()) {
                    v.push(w);
                }
            }
            for ((spec, customer), set) in &part.sessions {
                for s in &set.sessions {
                    let key = WindowKey {
                        spec: *spec,
                        group: customer.clone(),
                        start: s.start,
                    };
                    if let Effect::Window(w) = self.update(*p, &key, session_row(s)) {
                        v.push(w);
                    }
                }
            }
        }
        v.sort_by(|a, b| (a.partition, &a.key).cmp(&(b.partition, &b.key)));
        v
    }
}
