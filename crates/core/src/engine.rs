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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::aggregate::{customer_hash, Aggregate};
use super::order::{
    enrich, parse_order_fields, EnrichedOrder, FieldSpan, FxTable, FxUpdate, Limits, Rejection,
};
use super::window::{assign, GroupBy, WindowKind, WindowSpec};

pub type Partition = i32;
pub type Offset = i64;

/// Identifies one call of [`Engine::flush`]; increasing.
pub type FlushId = u64;

/// Everything that defines the core's semantics. Validated by [`CoreConfig::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct CoreConfig {
    pub windows: Vec<WindowSpec>,
    /// Allowed out-of-orderness: the watermark trails the largest event time by this much.
    pub out_of_orderness_ms: i64,
    /// A window closes when the watermark reaches `end + grace`.
    pub grace_ms: i64,
    /// A partition without records for this long (wall clock) is idle.
    pub idle_timeout_ms: i64,
    /// A second order with the same `order_id` within this event-time span is a duplicate.
    pub dedup_horizon_ms: i64,
    pub limits: Limits,
    /// Orders worth at least this many micro-dollars raise an alert.
    pub alert_threshold_usd_micros: i64,
    /// Seeds the engine's hash maps (keys like `order_id` come from
    /// outside, so the shell gives a random seed to keep collisions
    /// unpredictable). Given as a value: the core draws no randomness.
    /// Nothing depends on it but speed: no output, state row or iteration
    /// order that matters is derived from a map's order.
    pub hash_seed: u64,
    /// How long, in event time after its end, a closed window or session
    /// stays served: then it is tombstoned on `revenue-windows` (one
    /// [`Effect::Expired`] per partial), so the topic and every view stay
    /// bounded.
    pub window_retention_ms: i64,
}

/// One day, like Kafka Streams' default retention of windowed stores.
pub const DEFAULT_WINDOW_RETENTION_MS: i64 = 86_400_000;

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            windows: WindowSpec::defaults(),
            out_of_orderness_ms: 5_000,
            grace_ms: 10_000,
            idle_timeout_ms: 30_000,
            dedup_horizon_ms: 3_600_000,
            limits: Limits::default(),
            alert_threshold_usd_micros: 5_000 * 1_000_000,
            hash_seed: 0,
            window_retention_ms: DEFAULT_WINDOW_RETENTION_MS,
        }
    }
}

/// A configuration value that cannot work; `field` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn cfg_err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl CoreConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.windows.is_empty() {
            return Err(cfg_err("windows", "at least one window is required"));
        }
        if self.windows.len() > usize::from(u16::MAX) {
            return Err(cfg_err("windows", "too many windows"));
        }
        let mut names = HashSet::new();
        for w in &self.windows {
            w.validate().map_err(|m| cfg_err("windows", m))?;
            if !names.insert(&w.name) {
                return Err(cfg_err(
                    "windows",
                    format!("window name {:?} is used twice", w.name),
                ));
            }
        }
        for (field, v) in [
            ("out_of_orderness_ms", self.out_of_orderness_ms),
            ("grace_ms", self.grace_ms),
        ] {
            if v < 0 {
                return Err(cfg_err(field, format!("must be ≥ 0, got {v}")));
            }
        }
        if self.idle_timeout_ms <= 0 {
            return Err(cfg_err("idle_timeout_ms", "must be > 0"));
        }
        // The horizon must outlive every window an order can still change;
        // otherwise a redelivered order could be counted twice.
        let need = self.max_extent_ms() + self.grace_ms;
        if self.dedup_horizon_ms < need {
            return Err(cfg_err(
                "dedup_horizon_ms",
                format!(
                    "must be ≥ the longest window extent plus grace ({need} ms), got {}",
                    self.dedup_horizon_ms
                ),
            ));
        }
        // A window must still be served once it closes (end + grace).
        if self.window_retention_ms <= self.grace_ms {
            return Err(cfg_err(
                "window_retention_ms",
                format!(
                    "must be > grace_ms ({} ms): a window closes at its end plus grace, and is served until its end plus retention; got {}",
                    self.grace_ms, self.window_retention_ms
                ),
            ));
        }
        let l = &self.limits;
        if l.max_message_bytes == 0 {
            return Err(cfg_err("max_message_bytes", "must be > 0"));
        }
        if l.min_event_ms >= l.max_event_ms {
            return Err(cfg_err("min_event_time", "must be before max_event_time"));
        }
        if l.max_amount_micros <= 0 {
            return Err(cfg_err("max_amount", "must be > 0"));
        }
        if self.alert_threshold_usd_micros <= 0 {
            return Err(cfg_err("alert_threshold_usd", "must be > 0"));
        }
        Ok(())
    }

    fn max_extent_ms(&self) -> i64 {
        self.windows
            .iter()
            .map(|w| w.kind.extent_ms())
            .max()
            .unwrap_or(0)
    }

    /// A fingerprint of what state rows mean: the window definitions. State
    /// written under another fingerprint must not be mixed with this one.
    pub fn state_fingerprint(&self) -> u64 {
        let text = serde_json::to_string(&self.windows).unwrap_or_default();
        customer_hash(&text)
    }
}

/// Identifies a window within a partition: the spec (by index), the group key
/// and the start. For sessions the group is the customer and the start the
/// session's first event time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowKey {
    pub spec: u16,
    pub group: String,
    pub start: i64,
}

/// A stored tumbling or sliding window, and the shape of every window result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRow {
    /// Exclusive end for tumbling and sliding windows; for sessions, the time
    /// of the last event (sessions span `[first, last]`).
    pub end: i64,
    pub agg: Aggregate,
    /// The highest input offset folded into this row.
    pub offset: Offset,
    /// The final result has been emitted; the row never changes again.
    pub closed: bool,
}

/// One session of a customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Time of the first event: the session's id.
    pub start: i64,
    /// Time of the last event.
    pub last: i64,
    pub agg: Aggregate,
    /// The highest input offset folded into this session.
    pub offset: Offset,
    pub closed: bool,
}

/// All sessions of one customer for one session definition: the unit of
/// session state. Storing them as one row means a restore sees the whole
/// list as of one flush, so one offset covers all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSet {
    /// Sorted by start; open sessions and closed ones awaiting their purge.
    pub sessions: Vec<Session>,
    /// Starts of superseded sessions whose retraction is not yet durable; a
    /// restore emits them again.
    pub retracted: Vec<i64>,
    /// The highest input offset folded into any of them.
    pub offset: Offset,
}

impl SessionSet {
    /// No session and no retraction waiting: the set's row is deleted.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.retracted.is_empty()
    }
}

/// A dedup entry: the first occurrence of an `order_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRow {
    pub event_ms: i64,
    pub offset: Offset,
}

/// The dedup entries one flush made in one partition, as one row: the
/// changelog's form of dedup state.
///
/// Why: one changelog record an order (and a tombstone an hour later)
/// was the largest share of what the job wrote: of the 2.3 records each
/// order cost in the throughput scenario, one was its dedup entry (1.37
/// with segments, BENCHMARKS.md). A segment is one record a partition a
/// flush, and one tombstone when all of its entries have expired. The
/// shell's store expands a segment into per-id rows (its point lookups
/// and expiry index stay per id) and keeps the segment's key with no
/// entries, so a pod knows which segments to tombstone. Per-id deletes
/// stay local ([`StateChange::in_changelog`]): an expired entry restored
/// from a segment not yet tombstoned counts as absent anyway (an entry
/// counts only until its expiry), and is expired again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupSegment {
    /// When every entry has expired: the latest event time plus the
    /// dedup horizon. The segment is tombstoned once a durable watermark
    /// covers it.
    pub expire_ms: i64,
    /// Empty in the store's copy (its entries are rows of their own there).
    pub entries: Vec<(String, DedupRow)>,
}

/// A segment's entries stop at about this many bytes of ids, so that a
/// flush of many orders makes records well under Kafka's default
/// `message.max.bytes` (1 MB).
const SEGMENT_BYTES: usize = 256 * 1024;

/// Per-partition progress: where to resume, and the watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// The next input offset to apply; everything below is already in state.
    pub next_offset: Offset,
    pub max_event_ms: Option<i64>,
    pub watermark: Option<i64>,
}

/// One row of partition state, as stored and restored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateRow {
    /// A tumbling or sliding window. Its customer set is not in the row
    /// (it is empty there) but in its [`StateRow::Members`] rows.
    Window(WindowKey, WindowRow),
    /// Keyed by (session spec, customer).
    Sessions(u16, String, SessionSet),
    Dedup(String, DedupRow),
    Meta(PartitionMeta),
    /// Customers a window gained in one flush, chunk `n` of that window.
    ///
    /// Why apart: a busy window holds tens of thousands of customers, and
    /// writing the whole set with every update made each flush cost as
    /// much as the windows' sizes, not the records. Chunks are written
    /// before their window's row in the same flush (so a stored row always
    /// has its chunks, even from a flush cut in half), unioned on restore,
    /// and deleted after the window's row when it is purged (so a cut
    /// leaves orphan chunks, which a restore deletes, never a window
    /// missing customers). A set is a union, so a chunk holding customers
    /// of records that are replayed anyway changes nothing.
    Members(WindowKey, u64, Vec<u64>),
    /// A closed window or session whose partial is still served: when
    /// its expiry (event time) is durable it is tombstoned downstream and
    /// this row deleted. Kept apart from the window's row, which leaves
    /// the state at close; a few bytes a window.
    Expiry(WindowKey, i64),
    /// Dedup entries made by one flush: (the partition's next input
    /// offset at that flush, chunk number, entries). Appended last, so
    /// the other variants keep their encoding.
    DedupSegment(i64, u32, DedupSegment),
}

/// The key of a [`StateRow`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RowKey {
    Window(WindowKey),
    Sessions(u16, String),
    Dedup(String),
    Meta,
    Members(WindowKey, u64),
    Expiry(WindowKey),
    DedupSegment(i64, u32),
}

impl StateRow {
    pub fn key(&self) -> RowKey {
        match self {
            StateRow::Window(k, _) => RowKey::Window(k.clone()),
            StateRow::Sessions(s, c, _) => RowKey::Sessions(*s, c.clone()),
            StateRow::Dedup(id, _) => RowKey::Dedup(id.clone()),
            StateRow::Meta(_) => RowKey::Meta,
            StateRow::Members(k, n, _) => RowKey::Members(k.clone(), *n),
            StateRow::Expiry(k, _) => RowKey::Expiry(k.clone()),
            StateRow::DedupSegment(seq, n, _) => RowKey::DedupSegment(*seq, *n),
        }
    }
}

/// A change to partition state, to be written durably by the shell.
#[derive(Clone, Debug, PartialEq)]
pub enum StateChange {
    Put(Partition, StateRow),
    Delete(Partition, RowKey),
}

/// How many ordering groups a flush's changes fall into; see
/// [`StateChange::group`].
pub const CHANGE_GROUPS: usize = 4;

impl StateChange {
    /// The change's ordering group: a flush's changes must become durable
    /// group by group (every change of group `g` before any of `g + 1`),
    /// and within a group in any order and any subset.
    ///
    /// Why: a changelog producer does not keep a flush gapless (a failed
    /// record is sent again after later ones were acknowledged), so a crash
    /// can leave any subset of what was in flight. A state made of whole
    /// groups plus any subset of the next one is one some prefix of the
    /// input produces, given the per-row offsets (law
    /// `crash_with_any_subset_of_a_group_then_replay_is_exact`):
    /// 0. member chunks written: a chunk without its window row only holds
    ///    customers of records that are replayed anyway (a union);
    /// 1. windows, sessions and dedup entries, written or deleted: each row
    ///    carries the offsets folded into it, so any subset replays exactly;
    /// 2. member chunks deleted, after their window's row is gone;
    /// 3. partition meta (next offset, watermark), last: it vouches for
    ///    everything before it.
    pub fn group(&self) -> usize {
        match self {
            StateChange::Put(_, StateRow::Members(..)) => 0,
            StateChange::Delete(_, RowKey::Members(..)) => 2,
            StateChange::Put(_, StateRow::Meta(_)) | StateChange::Delete(_, RowKey::Meta) => 3,
            _ => 1,
        }
    }

    /// Whether the change goes to the changelog as well as to the local
    /// store. A per-id dedup delete does not: the changelog holds dedup
    /// entries as segments ([`DedupSegment`]), tombstoned whole.
    pub fn in_changelog(&self) -> bool {
        !matches!(self, StateChange::Delete(_, RowKey::Dedup(_)))
    }
}

/// A window's current result.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowUpdate {
    pub partition: Partition,
    pub spec_name: String,
    pub kind: WindowKind,
    pub by: GroupBy,
    pub key: WindowKey,
    pub row: WindowRow,
}

impl WindowUpdate {
    pub fn is_final(&self) -> bool {
        self.row.closed
    }

    /// A deterministic id, the same on every pod: `spec|group|start`.
    pub fn window_id(&self) -> String {
        window_id(&self.spec_name, &self.key)
    }
}

/// `spec|group|start`: the id of a window across partitions.
pub fn window_id(spec_name: &str, key: &WindowKey) -> String {
    format!("{}|{}|{}", spec_name, key.group, key.start)
}

/// What the shell must do. Effects of one record come out in the order the
/// record caused them; window updates of open windows come out at flush.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// A valid order folded into at least one window (→ `enriched-orders`).
    /// `late_windows` counts the window definitions for which it came too late.
    Accepted {
        partition: Partition,
        offset: Offset,
        order: EnrichedOrder,
        alert: bool,
        late_windows: u16,
    },
    /// A valid order whose windows had all closed (→ late policy).
    Late {
        partition: Partition,
        offset: Offset,
        order: EnrichedOrder,
        alert: bool,
    },
    /// Input that cannot be used (→ `orders-dlq`).
    Rejected {
        partition: Partition,
        offset: Offset,
        rejection: Rejection,
    },
    /// A second order with an `order_id` seen within the horizon; not counted.
    Duplicate {
        partition: Partition,
        offset: Offset,
        order_id: String,
    },
    /// A window's result; `row.closed` is the final flag.
    Window(WindowUpdate),
    /// A session superseded by a merge or an earlier event: its id must be
    /// tombstoned downstream.
    Retracted {
        partition: Partition,
        spec_name: String,
        key: WindowKey,
    },
    /// A closed window or session past its retention: its partial must be
    /// tombstoned downstream (once; idempotent if repeated after a crash).
    Expired {
        partition: Partition,
        spec_name: String,
        key: WindowKey,
    },
}

/// Observable progress of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionStatus {
    pub next_offset: Offset,
    pub watermark: Option<i64>,
    pub idle: bool,
}

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

impl Part {
    /// `specs`: how many window definitions (one close-time index scan
    /// each).
    fn new(wall_ms: i64, seed: u64, specs: usize) -> Self {
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

    fn meta(&self) -> PartitionMeta {
        PartitionMeta {
            next_offset: self.next_offset,
            max_event_ms: self.max_event_ms,
            watermark: self.watermark,
        }
    }

    fn status(&self) -> PartitionStatus {
        PartitionStatus {
            next_offset: self.next_offset,
            watermark: self.watermark,
            idle: self.idle,
        }
    }

    /// Idle: no record for `timeout` of wall time, and nothing to read.
    fn mark_idle(&mut self, wall_ms: i64, timeout: i64) {
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
    fn restore_dedup(&mut self, id: String, d: DedupRow, horizon: i64) {
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

    fn is_closed_at(&self, close_at: i64) -> bool {
        matches!(self.watermark, Some(wm) if close_at <= wm)
    }

    /// Reads a session set not in memory from the store into memory, its
    /// open sessions into the closing set (`gap_grace`: the definition's
    /// gap plus the grace). Nothing stored: nothing happens.
    fn read_sessions(
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

/// A session set that must stay in memory until its purge: it has a
/// closed session or a retraction waiting for a durable flush.
fn needs_memory(set: &SessionSet) -> bool {
    !set.retracted.is_empty() || set.sessions.iter().any(|s| s.closed)
}

fn session_row(s: &Session) -> WindowRow {
    WindowRow {
        end: s.last,
        agg: s.agg.clone(),
        offset: s.offset,
        closed: s.closed,
    }
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

    /// Applies one input record. Records below the partition's next offset
    /// were already applied and are ignored.
    pub fn on_record(
        &mut self,
        p: Partition,
        offset: Offset,
        payload: &[u8],
        wall_ms: i64,
        out: &mut Vec<Effect>,
    ) {
        debug_assert!(self.dedup_limit.is_none(), "a cache limit needs a reader");
        self.on_record_in(p, offset, payload, wall_ms, out, &mut InMemory);
    }

    /// [`Engine::on_record`], reading dedup entries not in memory through
    /// `reader`.
    pub fn on_record_in(
        &mut self,
        p: Partition,
        offset: Offset,
        payload: &[u8],
        wall_ms: i64,
        out: &mut Vec<Effect>,
        reader: &mut dyn StateReader,
    ) {
        self.fields.clear();
        let next_flush = self.flush_seq + 1;
        let session_limited = self.session_limit.is_some();
        let part = self
            .parts
            .entry(p)
            .or_insert_with(|| Part::new(wall_ms, self.cfg.hash_seed, self.cfg.windows.len()));
        if offset < part.next_offset {
            return;
        }
        part.next_offset = offset + 1;
        part.last_active_wall = wall_ms;
        part.idle = false;
        part.meta_dirty = true;

        let parsed = parse_order_fields(payload, &self.cfg.limits, &mut self.fields);
        let order = match parsed.and_then(|o| enrich(o, &self.fx, wall_ms)) {
            Ok(o) => o,
            Err(rejection) => {
                out.push(Effect::Rejected {
                    partition: p,
                    offset,
                    rejection,
                });
                return;
            }
        };
        // An expired entry waiting for its purge counts as absent, so the
        // outcome never depends on when flushes happened.
        let horizon = self.cfg.dedup_horizon_ms;
        if self.dedup_limit.is_some() {
            if part.dedup.contains_key(&order.order.order_id) {
                self.cache.dedup.hits += 1;
            } else {
                self.cache.dedup.misses += 1;
                if let Some(row) = reader.dedup(p, &order.order.order_id) {
                    part.dedup.insert(order.order.order_id.clone(), row);
                }
            }
        }
        let live = part
            .dedup
            .get(&order.order.order_id)
            .filter(|d| !part.is_closed_at(d.event_ms + horizon));
        let first_seen = match live {
            Some(d) if d.offset < offset => {
                out.push(Effect::Duplicate {
                    partition: p,
                    offset,
                    order_id: order.order.order_id,
                });
                return;
            }
            // The same record again (a replay after a partial flush).
            Some(_) => false,
            None => true,
        };

        let t = order.order.created_at_ms;
        let customer = customer_hash(&order.order.customer_id);
        let grace = self.cfg.grace_ms;
        let mut open = 0u16;
        let mut late = 0u16;
        for (i, spec) in self.cfg.windows.iter().enumerate() {
            let spec_ix = i as u16;
            let folded = match spec.kind {
                WindowKind::Session { gap_ms } => {
                    let fold = SessionFold {
                        p,
                        spec_ix,
                        spec_name: &spec.name,
                        gap: gap_ms,
                        grace,
                        offset,
                        next_flush,
                    };
                    let cache = session_limited.then_some(&mut self.cache.sessions);
                    fold.apply(part, &order, customer, out, cache, reader)
                }
                _ => {
                    // One key, reused: looking up a window that exists
                    // (the common case) allocates nothing.
                    let key = &mut self.scratch;
                    key.spec = spec_ix;
                    key.group.clear();
                    key.group.push_str(spec.by.key_of(&order));
                    let mut any = false;
                    for (start, end) in assign(&spec.kind, t) {
                        let close_at = end + grace;
                        if part.is_closed_at(close_at) {
                            continue;
                        }
                        any = true;
                        key.start = start;
                        fold_fixed(part, key, end, close_at, &order, customer, offset);
                    }
                    any
                }
            };
            if folded {
                open += 1;
            } else {
                late += 1;
            }
        }

        if first_seen {
            let expire = t + horizon;
            if !part.is_closed_at(expire) {
                part.dedup.insert(
                    order.order.order_id.clone(),
                    DedupRow {
                        event_ms: t,
                        offset,
                    },
                );
                if self.dedup_limit.is_none() {
                    part.dedup_expiry
                        .insert((expire, order.order.order_id.clone()));
                }
                part.dedup_touched.insert(order.order.order_id.clone());
            }
        }

        let alert = order.amount_usd_micros >= self.cfg.alert_threshold_usd_micros;
        if open > 0 {
            out.push(Effect::Accepted {
                partition: p,
                offset,
                order,
                alert,
                late_windows: late,
            });
        } else {
            out.push(Effect::Late {
                partition: p,
                offset,
                order,
                alert,
            });
        }

        if part.max_event_ms.is_none_or(|m| t > m) {
            part.max_event_ms = Some(t);
            let candidate = t - self.cfg.out_of_orderness_ms;
            if part.watermark.is_none_or(|w| candidate > w) {
                part.watermark = Some(candidate);
                self.advance(p, out, reader);
            }
        }
    }

    /// What the shell knows of partition `p`'s input, before each tick.
    /// Only the broker can make a partition idle, by having nothing for it:
    /// a partition [`Readable::Behind`] (records wait to be read) stops
    /// being idle at once (its watermark stays where it got to), and one
    /// the shell has [`Readable::Paused`] (a flush waiting for
    /// acknowledgements, a full producer queue, a restore) keeps whatever
    /// idleness it had: its lag is unknown while nothing is fetched, so
    /// the wall clock that passes meanwhile does not make it idle. Before,
    /// the pod's own pauses made partitions idle, their watermarks jumped
    /// to the others', and their in-order backlog became late.
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

    fn release_idle(&mut self, out: &mut Vec<Effect>, reader: &mut dyn StateReader) {
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
    fn advance(&mut self, p: Partition, out: &mut Vec<Effect>, reader: &mut dyn StateReader) {
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
    /// (issue 17: end-to-end p99 of 384–498 ms at half the maximum load).
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
    fn open_sessions(
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

    /// Beyond the session cache limit, drops every clean session set: not
    /// changed since the last flush, not in a flush not yet durable, and
    /// with nothing awaiting a purge (a closed session, a retraction), so
    /// the reader returns it as it is. Their open sessions leave the
    /// closing set; the store's close-time index has them, and the scan
    /// hint comes down to the earliest of them.
    fn evict_sessions(&mut self) {
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
    fn evict_dedup(&mut self) {
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

fn fold_fixed(
    part: &mut Part,
    key: &WindowKey,
    end: i64,
    close_at: i64,
    order: &EnrichedOrder,
    customer: u64,
    offset: Offset,
) {
    match part.windows.get_mut(key) {
        Some(row) => {
            // A closed row never changes; a row that already holds this
            // offset (restored from a flush cut in half) must not count it twice.
            if row.closed || row.offset >= offset {
                return;
            }
            if add_order(&mut row.agg, order, customer) {
                match part.new_members.get_mut(key) {
                    Some(v) => v.push(customer),
                    None => {
                        part.new_members.insert(key.clone(), vec![customer]);
                    }
                }
            }
            row.offset = offset;
            touch(&mut part.touched, key);
        }
        None => {
            let mut agg = Aggregate::default();
            add_order(&mut agg, order, customer);
            part.new_members.insert(key.clone(), vec![customer]);
            part.windows.insert(
                key.clone(),
                WindowRow {
                    end,
                    agg,
                    offset,
                    closed: false,
                },
            );
            part.closing.insert((close_at, key.clone()));
            part.touched.insert(key.clone(), false);
        }
    }
}

/// Marks `key` changed and not announced (a clone only when new).
fn touch<K: std::hash::Hash + Eq + Clone>(touched: &mut FastMap<K, bool>, key: &K) {
    match touched.get_mut(key) {
        Some(announced) => *announced = false,
        None => {
            touched.insert(key.clone(), false);
        }
    }
}

/// The keys of `touched` not announced since their last change, marked
/// announced.
fn unannounced<K: Clone>(touched: &mut FastMap<K, bool>) -> Vec<K> {
    touched
        .iter_mut()
        .filter(|(_, announced)| !**announced)
        .map(|(k, announced)| {
            *announced = true;
            k.clone()
        })
        .collect()
}

/// Returns whether the customer is new in `agg`.
fn add_order(agg: &mut Aggregate, o: &EnrichedOrder, customer: u64) -> bool {
    agg.add(
        o.amount_usd_micros,
        o.order.currency,
        o.order.amount_micros,
        customer,
    )
}

/// Folding one order into its customer's sessions for one definition.
struct SessionFold<'a> {
    p: Partition,
    spec_ix: u16,
    spec_name: &'a str,
    gap: i64,
    grace: i64,
    offset: Offset,
    next_flush: FlushId,
}

impl SessionFold<'_> {
    /// Returns false when the order is late for this definition: its own
    /// session `[t, t]` would already be closed.
    ///
    /// Closed sessions are final and take no part in merging (as in Flink):
    /// an order that arrives after its neighbour closed, but whose own
    /// session is still open, starts or joins another session. So whether a
    /// closed session is still held or already purged changes nothing.
    /// `cache`: with a session cache limit, its counters; a set not in
    /// memory is then read through `reader`.
    fn apply(
        &self,
        part: &mut Part,
        order: &EnrichedOrder,
        customer: u64,
        out: &mut Vec<Effect>,
        cache: Option<&mut RowCacheStats>,
        reader: &mut dyn StateReader,
    ) -> bool {
        let (gap, grace) = (self.gap, self.grace);
        let t = order.order.created_at_ms;
        if part.is_closed_at(t + gap + grace) {
            return false;
        }
        let cust = &order.order.customer_id;
        // Look up before inserting: a customer seen before costs one key
        // (the lookup's), not the two an `entry` and its clone would.
        let skey = (self.spec_ix, cust.clone());
        if let Some(cache) = cache {
            if part.sessions.contains_key(&skey) {
                cache.hits += 1;
            } else {
                cache.misses += 1;
                part.read_sessions(self.p, skey.clone(), gap + grace, reader);
            }
        }
        let set = match part.sessions.get_mut(&skey) {
            Some(set) => set,
            None => part.sessions.entry(skey.clone()).or_default(),
        };
        if set.offset >= self.offset && !set.is_empty() {
            // This customer's sessions already hold this record (a replay
            // after a flush that was cut in half).
            return true;
        }
        // Open sessions closer than `gap` to the event merge with it.
        let mut touching: Vec<Session> = Vec::new();
        let mut i = 0;
        while i < set.sessions.len() {
            let s = &set.sessions[i];
            if !s.closed && s.start - gap < t && t < s.last + gap {
                touching.push(set.sessions.remove(i));
            } else {
                i += 1;
            }
        }
        let mut merged = Session {
            start: t,
            last: t,
            agg: Aggregate::default(),
            offset: self.offset,
            closed: false,
        };
        part.open_sessions = (part.open_sessions + 1).saturating_sub(touching.len());
        for s in &touching {
            merged.start = merged.start.min(s.start);
            merged.last = merged.last.max(s.last);
            merged.agg.merge(&s.agg);
            part.closing
                .remove(&(s.last + gap + grace, self.key(cust, s.start)));
        }
        add_order(&mut merged.agg, order, customer);
        for s in &touching {
            if s.start != merged.start {
                let key = self.key(cust, s.start);
                out.push(Effect::Retracted {
                    partition: self.p,
                    spec_name: self.spec_name.to_string(),
                    key: key.clone(),
                });
                set.retracted.push(s.start);
                part.pending_purge
                    .push(Purge::Retraction(self.next_flush, key));
            }
        }
        part.closing
            .insert((merged.last + gap + grace, self.key(cust, merged.start)));
        let at = set.sessions.partition_point(|s| s.start < merged.start);
        crate::aggregate::first_of_many(&mut set.sessions);
        set.sessions.insert(at, merged);
        set.offset = self.offset;
        touch(&mut part.sessions_touched, &skey);
        true
    }

    fn key(&self, customer: &str, start: i64) -> WindowKey {
        WindowKey {
            spec: self.spec_ix,
            group: customer.to_string(),
            start,
        }
    }
}
