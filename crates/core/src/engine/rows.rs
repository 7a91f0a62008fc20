//! State rows and their keys: what a partition's state is made of, as
//! stored, restored and sent to the changelog.

use super::*;

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
pub(super) const SEGMENT_BYTES: usize = 256 * 1024;

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
