//! The global serving view: every pod materialises `revenue-windows` from
//! all partitions, so any pod answers for the whole group.
//!
//! Pure: decoded updates in, answers out. The shell's `wire` module decodes
//! `revenue-windows` records into [`ViewUpdate`]s; its follower feeds them
//! here.
//!
//! - A window's rows come from several input partitions (one partial
//!   aggregate each). Answers merge them; the merge is exact (the
//!   [`PartialAgg`] monoid).
//! - A partial's final is sticky: a non-final row arriving after a final one
//!   (a replay after a crash) is ignored.
//! - A tombstone removes a partial (a retracted session).
//! - A merged tumbling/sliding window is final when every partial is final
//!   and every input partition's watermark has passed its close time, so a
//!   lagging partition cannot add to a window already shown as final.
//! - Progress rows carry each input partition's next offset and watermark:
//!   the `as_of` of every answer.
//! - Every row carries its writer's ownership epoch. A row (window partial
//!   or progress) from an older epoch than the one already applied for the
//!   same key is a stale writer's (a pod that lost the partition without
//!   knowing it) and is ignored: within one key, rows arrive in the order
//!   they were written, so an older epoch after a newer one can only be a
//!   zombie's.
//!
//! Files: this one holds the view's state and how updates apply to it;
//! `query` answers; `shelf` keeps sessions on the shell's store behind a
//! write-back cache.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::aggregate::{usd, PartialAgg};
use crate::engine::Partition;
use crate::order::MICROS;
use crate::vecs::first_of_many;

/// An input partition's progress, as published by the pod that owns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub partition: Partition,
    pub next_offset: i64,
    pub watermark: Option<i64>,
    pub idle: bool,
    /// The writer's ownership epoch (0: written before epochs existed).
    #[serde(default)]
    pub epoch: u64,
}

/// What the view keeps of one input partition's row of a window: the
/// mergeable aggregate and the final flag, not the whole record.
#[derive(Clone, Debug)]
struct Partial {
    is_final: bool,
    epoch: u64,
    agg: PartialAgg,
}

/// What names a window. The names are shared (`Arc`): a million sessions
/// hold three pointers to one "sessions", "session" and "customer".
#[derive(Clone, Debug)]
struct Head {
    spec: Arc<str>,
    kind: Arc<str>,
    by: Arc<str>,
    key: Arc<str>,
    start: i64,
    end: i64,
}

impl Head {
    /// `spec|key|start`, as the pod names the window (`core::window_id`).
    fn window_id(&self) -> String {
        format!("{}|{}|{}", self.spec, self.key, self.start)
    }
}

/// One window: its partials by input partition, in partition order (a
/// small sorted vector: most windows have one or a handful).
///
/// Memory matters here: every pod holds every window and session of the
/// group, a million sessions in a normal load.
#[derive(Clone, Debug)]
struct Entry {
    head: Head,
    partials: Vec<(Partition, Partial)>,
    /// Kept current on every change, so `/revenue` adds numbers instead of
    /// merging aggregates per request.
    revenue_micros: i128,
    count: u64,
    all_final: bool,
}

impl Entry {
    fn new(head: Head) -> Entry {
        Entry {
            head,
            partials: Vec::new(),
            revenue_micros: 0,
            count: 0,
            all_final: false,
        }
    }

    fn refresh(&mut self) {
        self.revenue_micros = self
            .partials
            .iter()
            .map(|(_, p)| p.agg.revenue_usd_micros)
            .sum();
        self.count = self.partials.iter().map(|(_, p)| p.agg.count).sum();
        self.all_final = !self.partials.is_empty() && self.partials.iter().all(|(_, p)| p.is_final);
    }

    /// Applies one partition's row; a final row is sticky, and a row of an
    /// older writer epoch than the one applied is a stale writer's.
    /// Returns whether the row was applied.
    fn set(&mut self, partition: Partition, end: i64, p: Partial) -> bool {
        match self.partials.binary_search_by_key(&partition, |e| e.0) {
            Ok(i) if self.partials[i].1.epoch > p.epoch => return false,
            Ok(i) if self.partials[i].1.is_final && !p.is_final => return true,
            Ok(i) => self.partials[i].1 = p,
            Err(i) => {
                // Most windows have one partial: no room for four.
                first_of_many(&mut self.partials);
                self.partials.insert(i, (partition, p))
            }
        }
        self.head.end = self.head.end.max(end);
        self.refresh();
        true
    }

    /// Removes one partition's row; returns whether none is left.
    fn remove(&mut self, partition: Partition) -> bool {
        if let Ok(i) = self.partials.binary_search_by_key(&partition, |e| e.0) {
            self.partials.remove(i);
            self.refresh();
        }
        self.partials.is_empty()
    }
}

/// Which windows a query wants.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowQuery {
    pub kind: String,
    pub by: String,
    pub key: Option<String>,
    /// Window start ≥ from (ms).
    pub from: Option<i64>,
    /// Window start < to (ms).
    pub to: Option<i64>,
    pub is_final: Option<bool>,
    pub limit: usize,
    /// One definition by name (served even if no longer configured);
    /// `None`: every configured definition of the kind and group-by.
    pub spec: Option<String>,
}

/// Why the view cannot say which definition a revenue query means.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    #[error("no window definition is named {0:?}")]
    Unknown(String),
    #[error("window definition {0:?} is not tumbling: /revenue sums tumbling windows")]
    NotTumbling(String),
    #[error(
        "several tumbling definitions group by {by} with the same size ({names}): name one with window="
    )]
    Ambiguous { by: String, names: String },
}

/// One merged window, as served.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowView {
    pub window_id: String,
    pub spec: String,
    pub kind: String,
    pub by: String,
    pub key: String,
    pub start: i64,
    pub end: i64,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub partitions: Vec<Partition>,
    pub count: u64,
    pub revenue_usd: f64,
    /// The exact sum, for comparisons (replay); `revenue_usd` is for display.
    #[serde(skip)]
    pub revenue_usd_micros: i128,
    pub revenue_by_currency: BTreeMap<String, f64>,
    pub unique_customers: usize,
    pub avg_usd: Option<f64>,
    pub min_usd: Option<f64>,
    pub max_usd: Option<f64>,
    pub p95_usd: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Split {
    pub final_usd: f64,
    pub live_usd: f64,
    pub combined_usd: f64,
    pub final_orders: u64,
    pub live_orders: u64,
    /// The exact sums behind `final_usd` and `live_usd`, so that sums of
    /// splits are exact too ([`Split::total`]).
    #[serde(skip)]
    pub final_micros: i128,
    #[serde(skip)]
    pub live_micros: i128,
}

impl Split {
    fn of(final_micros: i128, live_micros: i128, final_orders: u64, live_orders: u64) -> Split {
        Split {
            final_usd: usd(final_micros),
            live_usd: usd(live_micros),
            combined_usd: usd(final_micros + live_micros),
            final_orders,
            live_orders,
            final_micros,
            live_micros,
        }
    }

    /// The sum of `splits`, in integer micro-dollars, formatted once: a
    /// sum of the formatted floats is neither exact nor equal to another
    /// grouping's sum of the same orders.
    pub fn total<'a>(splits: impl IntoIterator<Item = &'a Split>) -> Split {
        let (mut f, mut l, mut fc, mut lc) = (0, 0, 0, 0);
        for s in splits {
            f += s.final_micros;
            l += s.live_micros;
            fc += s.final_orders;
            lc += s.live_orders;
        }
        Split::of(f, l, fc, lc)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AsOf {
    /// Minimum watermark over every input partition (`None` until each
    /// has reported one).
    pub watermark: Option<i64>,
    pub partitions: Vec<ProgressRecord>,
}

/// (start, spec, key): fixed windows sort by time first, for range queries.
type FixedKey = (i64, String, String);

/// One session as a [`SessionShelf`] keeps it: the names are implied (the
/// customer is the shelf's key; kind and group-by are always "session" and
/// "customer").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShelvedSession {
    pub spec: String,
    pub start: i64,
    pub end: i64,
    /// (input partition, final, writer epoch, partial aggregate).
    pub partials: Vec<(Partition, bool, u64, PartialAgg)>,
}

/// Where the view keeps its sessions when they must not all be in memory
/// (every pod materialises every session of the group, ten
/// million of them at 512 MiB). Keyed by customer: each value is that
/// customer's sessions, sorted by (spec, start). The shell implements it
/// over a local RocksDB that it rebuilds from `revenue-windows` at every
/// start (the view is a cache of the topic). A value interface: the view
/// stays pure, and what it answers depends only on what the shelf
/// returns.
pub trait SessionShelf: Send + Sync {
    /// The customer's sessions (empty: none).
    fn get(&self, customer: &str) -> Vec<ShelvedSession>;
    /// Replaces the customer's sessions (empty: removes the customer).
    fn put(&mut self, customer: &str, sessions: &[ShelvedSession]);
    /// Every customer's sessions, in any order, until `f` returns false.
    fn scan(&self, f: &mut dyn FnMut(&str, Vec<ShelvedSession>) -> bool);
    /// Replaces the sessions of every customer in `batch` (as [`put`]
    /// each; a shelf may write them as one batch).
    ///
    /// [`put`]: SessionShelf::put
    fn put_many(&mut self, batch: &[(Arc<str>, Vec<ShelvedSession>)]) {
        for (customer, sessions) in batch {
            self.put(customer, sessions);
        }
    }
}

#[derive(Default)]
pub struct View {
    grace_ms: i64,
    /// Tumbling and sliding windows by (kind, by) then (start, spec, key).
    fixed: HashMap<(String, String), BTreeMap<FixedKey, Entry>>,
    /// Sessions by customer, each customer's sorted by (spec, start).
    sessions: HashMap<Arc<str>, Vec<Entry>>,
    /// Spec, kind and group-by names, shared by every entry.
    names: HashSet<Arc<str>>,
    progress: BTreeMap<Partition, ProgressRecord>,
    records: u64,
    /// Rows ignored as a stale writer's (an older epoch than applied).
    stale: u64,
    /// How many partitions the input topic has (`None`: not known yet).
    input_partitions: Option<usize>,
    /// The configured window definitions (`None`: not told; every
    /// definition in the topic is served).
    definitions: Option<Vec<crate::window::WindowSpec>>,
    /// Retention of served windows (event time after their end); `None`:
    /// every window is kept.
    retention_ms: Option<i64>,
    /// Windows ending at or before this are gone for good: dropped whole,
    /// and a late row of one is not applied. Only grows.
    expired_before: Option<i64>,
    /// Where the last sweep of sessions stopped (they are swept less often:
    /// a sweep visits every customer).
    sessions_swept_at: Option<i64>,
    /// Windows and sessions dropped for their retention.
    expired: u64,
    /// With a shelf, sessions live there, not in `sessions`.
    shelf: Option<Box<dyn SessionShelf>>,
    /// With a shelf: the customers changed since the last write-back, as
    /// entries; the shelf's value of a customer here is stale. A customer's
    /// sessions change several times in a row (results announced, sealed,
    /// made final), and reading, decoding and writing them back each time
    /// was most of the view's work (in a profile of the throughput scenario). When more than
    /// `hot_cap` customers are here, a sixteenth of them (any) are written
    /// back as one batch: writing them all at once held the view's lock,
    /// and `/revenue` with it, for the whole batch.
    hot: HashMap<Arc<str>, Vec<Entry>>,
    hot_cap: usize,
    /// Sessions on the shelf.
    shelved: usize,
}

/// One decoded `revenue-windows` record.
#[derive(Clone, Debug, PartialEq)]
pub enum ViewUpdate {
    /// An input partition's progress.
    Progress(ProgressRecord),
    /// A partial removed (a retracted session): the window id and the partition.
    Tombstone(String, Partition),
    /// One input partition's partial of a window.
    Window(Partition, Box<WindowPartial>),
    /// Nothing to apply (a progress key with no value).
    Nothing,
}

/// One input partition's partial of a window, as the view needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowPartial {
    pub spec: String,
    pub kind: String,
    pub by: String,
    pub key: String,
    pub start: i64,
    pub end: i64,
    pub is_final: bool,
    /// The writer's ownership epoch.
    pub epoch: u64,
    pub agg: PartialAgg,
}

impl View {
    pub fn new(grace_ms: i64) -> View {
        View {
            grace_ms,
            ..View::default()
        }
    }

    /// Records applied so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Rows ignored so far because a newer writer epoch had already
    /// written their key.
    pub fn stale_ignored(&self) -> u64 {
        self.stale
    }

    /// Applies one decoded update.
    pub fn apply(&mut self, update: ViewUpdate) {
        self.records += 1;
        let (partition, rec) = match update {
            ViewUpdate::Progress(rec) => {
                if self
                    .progress
                    .get(&rec.partition)
                    .is_some_and(|old| old.epoch > rec.epoch)
                {
                    self.stale += 1;
                } else {
                    self.progress.insert(rec.partition, rec);
                    self.expire();
                }
                return;
            }
            ViewUpdate::Tombstone(id, partition) => {
                self.remove_partial(&id, partition);
                return;
            }
            ViewUpdate::Window(partition, rec) => (partition, *rec),
            ViewUpdate::Nothing => return,
        };
        let WindowPartial {
            spec,
            kind,
            by,
            key,
            start,
            end,
            is_final,
            epoch,
            agg,
        } = rec;
        if self.expired_before.is_some_and(|h| end <= h) {
            // Past its retention: a row of a window already dropped (read
            // late, or a topic not yet compacted) does not bring it back.
            return;
        }
        let partial = Partial {
            is_final,
            epoch,
            agg,
        };
        if kind == "session" {
            let customer = match self.sessions.get_key_value(key.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(key),
            };
            let head = Head {
                spec: self.intern(&spec),
                kind: self.intern(&kind),
                by: self.intern(&by),
                key: customer.clone(),
                start,
                end,
            };
            let applied = self.with_sessions(&customer, |list| {
                let i = match find_session(list, &spec, start) {
                    Ok(i) => i,
                    Err(i) => {
                        first_of_many(list);
                        list.insert(i, Entry::new(head));
                        i
                    }
                };
                list[i].set(partition, end, partial)
            });
            if !applied {
                self.stale += 1;
            }
        } else {
            let head = Head {
                spec: self.intern(&spec),
                kind: self.intern(&kind),
                by: self.intern(&by),
                key: Arc::from(key.as_str()),
                start,
                end,
            };
            let applied = self
                .fixed
                .entry((kind, by))
                .or_default()
                .entry((start, spec, key))
                .or_insert_with(|| Entry::new(head))
                .set(partition, end, partial);
            if !applied {
                self.stale += 1;
            }
        }
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    /// A tombstone names the window by id, `spec|key|start` (spec names
    /// have no `|`; a key may).
    fn remove_partial(&mut self, id: &str, partition: Partition) {
        let Some((spec, rest)) = id.split_once('|') else {
            return;
        };
        let Some((key, start)) = rest.rsplit_once('|') else {
            return;
        };
        let Ok(start) = start.parse::<i64>() else {
            return;
        };
        if self.shelf.is_none() && !self.sessions.contains_key(key) {
            return;
        }
        self.with_sessions(key, |list| {
            if let Ok(i) = find_session(list, spec, start) {
                if list[i].remove(partition) {
                    list.remove(i);
                }
            }
        });
        // A tumbling or sliding window is never retracted: its tombstone
        // is its retention passing on one input partition. The view drops
        // such a window whole, by its own horizon ([`View::set_retention`]),
        // never one partial at a time: a window must not be served with
        // some partitions' partials gone (its total would shrink).
    }

    /// Serves windows and sessions until `retention_ms` of event time
    /// after their end (by the global watermark), then drops them whole:
    /// what keeps every pod's view bounded, as the pods' tombstones keep
    /// the compacted topic bounded.
    pub fn set_retention(&mut self, retention_ms: i64) {
        self.retention_ms = Some(retention_ms);
        self.expire();
    }

    /// Windows and sessions dropped for their retention so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Windows held (fixed windows and sessions).
    pub fn len(&self) -> usize {
        self.fixed.values().map(BTreeMap::len).sum::<usize>()
            + self.sessions.values().map(Vec::len).sum::<usize>()
            + self.shelved
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops what the global watermark has taken past its retention.
    fn expire(&mut self) {
        let (Some(r), Some(wm)) = (self.retention_ms, self.global_watermark()) else {
            return;
        };
        let h = wm.saturating_sub(r);
        if self.expired_before.is_some_and(|old| h <= old) {
            return;
        }
        self.expired_before = Some(h);
        for m in self.fixed.values_mut() {
            // Keyed by start: every window ending by `h` starts before it.
            let gone: Vec<FixedKey> = m
                .range(..(h, String::new(), String::new()))
                .filter(|(_, e)| e.head.end <= h)
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                m.remove(&k);
                self.expired += 1;
            }
        }
        // Sessions are tombstoned by their pods; this sweep, at most once a
        // minute of event time (on a shelf, which it reads whole, once a
        // 24th of the retention), only catches what a tombstone missed.
        let every = if self.shelf.is_some() {
            (r / 24).max(60_000)
        } else {
            60_000
        };
        if self
            .sessions_swept_at
            .is_some_and(|t| h < t.saturating_add(every))
        {
            return;
        }
        self.sessions_swept_at = Some(h);
        let mut expired = 0;
        self.sessions.retain(|_, list| {
            let before = list.len();
            list.retain(|e| e.head.end > h);
            expired += (before - list.len()) as u64;
            !list.is_empty()
        });
        // The sweep reads the shelf whole: it must be current.
        self.write_back(usize::MAX);
        if let Some(shelf) = self.shelf.as_ref() {
            let mut stale: Vec<String> = Vec::new();
            shelf.scan(&mut |customer, list| {
                if list.iter().any(|s| s.end <= h) {
                    stale.push(customer.to_string());
                }
                true
            });
            for customer in stale {
                expired += self.with_sessions(&customer, |list| {
                    let before = list.len();
                    list.retain(|e| e.head.end > h);
                    (before - list.len()) as u64
                });
            }
        }
        self.expired += expired;
    }
}

mod query;
mod shelf;
use shelf::*;

#[cfg(test)]
mod tests;
