//! The global serving view: every pod materialises `revenue-windows` from
//! all partitions, so any pod answers for the whole group.
//!
//! This module is pure (no IO, no clock): records in, answers out. The
//! follower that feeds it from Kafka lives in `serving.rs`.
//!
//! - A window's rows come from several input partitions (one partial
//!   aggregate each). Answers merge them; the merge is exact (the core's
//!   aggregate monoid).
//! - A partial's final is sticky: a non-final row arriving after a final one
//!   (a replay after a crash) is ignored.
//! - A tombstone removes a partial (a retracted session).
//! - A merged tumbling/sliding window is final when every partial is final
//!   and every input partition's watermark has passed its close time, so a
//!   lagging partition cannot add to a window already shown as final.
//! - `__progress|p<partition>` rows carry each input partition's next offset
//!   and watermark: the `as_of` of every answer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::aggregate::first_of_many;
use crate::core::order::MICROS;
use crate::core::Partition;
use crate::output::{usd, WindowRecord, WireAgg};

/// Key prefix of progress rows on `revenue-windows`.
pub const PROGRESS_PREFIX: &str = "__progress|p";

/// An input partition's progress, as published by the pod that owns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub partition: Partition,
    pub next_offset: i64,
    pub watermark: Option<i64>,
    pub idle: bool,
}

impl ProgressRecord {
    pub fn key(partition: Partition) -> String {
        format!("{PROGRESS_PREFIX}{partition}")
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ViewError {
    #[error("record key is not UTF-8")]
    Key,
    #[error("record key {0:?} names no partition")]
    NoPartition(String),
    #[error("record {key:?} is not a window row: {message}")]
    Value { key: String, message: String },
}

/// What the view keeps of one input partition's row of a window: the
/// mergeable aggregate and the final flag, not the whole record.
#[derive(Clone, Debug)]
struct Partial {
    is_final: bool,
    agg: WireAgg,
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

    /// Applies one partition's row; a final row is sticky.
    fn set(&mut self, partition: Partition, end: i64, p: Partial) {
        match self.partials.binary_search_by_key(&partition, |e| e.0) {
            Ok(i) if self.partials[i].1.is_final && !p.is_final => return,
            Ok(i) => self.partials[i].1 = p,
            Err(i) => {
                // Most windows have one partial: no room for four.
                first_of_many(&mut self.partials);
                self.partials.insert(i, (partition, p))
            }
        }
        self.head.end = self.head.end.max(end);
        self.refresh();
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
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AsOf {
    /// Minimum watermark over the input partitions that reported one.
    pub watermark: Option<i64>,
    pub partitions: Vec<ProgressRecord>,
}

/// (start, spec, key): fixed windows sort by time first, for range queries.
type FixedKey = (i64, String, String);

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
}

/// Where a customer's session `(spec, start)` is, or would go, in its list.
fn find_session(list: &[Entry], spec: &str, start: i64) -> Result<usize, usize> {
    list.binary_search_by(|e| (&*e.head.spec, e.head.start).cmp(&(spec, start)))
}

/// One `revenue-windows` record, decoded.
pub enum Parsed {
    Progress(ProgressRecord),
    Tombstone(String, Partition),
    Window(String, Partition, Box<WindowRecord>),
    /// A progress key with no value: nothing to do.
    Nothing,
}

/// Decodes a record without touching the view (the expensive part).
pub fn parse(key: &[u8], payload: Option<&[u8]>) -> Result<Parsed, ViewError> {
    let value_err = |e: serde_json::Error| ViewError::Value {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    };
    if key.starts_with(PROGRESS_PREFIX.as_bytes()) {
        return match payload {
            Some(p) => Ok(Parsed::Progress(
                serde_json::from_slice(p).map_err(value_err)?,
            )),
            None => Ok(Parsed::Nothing),
        };
    }
    let (id, partition) = parse_key(key)?;
    match payload {
        None => Ok(Parsed::Tombstone(id, partition)),
        Some(p) => Ok(Parsed::Window(
            id,
            partition,
            Box::new(serde_json::from_slice(p).map_err(value_err)?),
        )),
    }
}

fn parse_key(key: &[u8]) -> Result<(String, Partition), ViewError> {
    let k = std::str::from_utf8(key).map_err(|_| ViewError::Key)?;
    let (id, p) = k
        .rsplit_once("|p")
        .ok_or_else(|| ViewError::NoPartition(k.to_string()))?;
    let p = p
        .parse()
        .map_err(|_| ViewError::NoPartition(k.to_string()))?;
    Ok((id.to_string(), p))
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

    /// Applies one `revenue-windows` record (`None`: a tombstone).
    /// Applies one `revenue-windows` record (`None`: a tombstone).
    pub fn apply(&mut self, key: &[u8], payload: Option<&[u8]>) -> Result<(), ViewError> {
        let parsed = parse(key, payload);
        self.apply_parsed(parsed)
    }

    /// Applies a record parsed by [`parse`] (parse outside the lock, apply
    /// under it).
    pub fn apply_parsed(&mut self, parsed: Result<Parsed, ViewError>) -> Result<(), ViewError> {
        self.records += 1;
        let (partition, rec) = match parsed? {
            Parsed::Progress(rec) => {
                self.progress.insert(rec.partition, rec);
                return Ok(());
            }
            Parsed::Tombstone(id, partition) => {
                self.remove_partial(&id, partition);
                return Ok(());
            }
            Parsed::Window(_, partition, rec) => (partition, *rec),
            Parsed::Nothing => return Ok(()),
        };
        let WindowRecord {
            spec,
            kind,
            by,
            key,
            start,
            end,
            is_final,
            agg,
            ..
        } = rec;
        // Decoded from JSON by pushes, the vectors have spare room; a
        // million sessions are held here.
        let mut agg = agg;
        agg.revenue_by_currency.shrink_to_fit();
        agg.sketch.shrink_to_fit();
        let partial = Partial { is_final, agg };
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
            let list = self.sessions.entry(customer).or_default();
            let i = match find_session(list, &spec, start) {
                Ok(i) => i,
                Err(i) => {
                    first_of_many(list);
                    list.insert(i, Entry::new(head));
                    i
                }
            };
            list[i].set(partition, end, partial);
        } else {
            let head = Head {
                spec: self.intern(&spec),
                kind: self.intern(&kind),
                by: self.intern(&by),
                key: Arc::from(key.as_str()),
                start,
                end,
            };
            self.fixed
                .entry((kind, by))
                .or_default()
                .entry((start, spec, key))
                .or_insert_with(|| Entry::new(head))
                .set(partition, end, partial);
        }
        Ok(())
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
        if let Some(list) = self.sessions.get_mut(key) {
            if let Ok(i) = find_session(list, spec, start) {
                if list[i].remove(partition) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.sessions.remove(key);
                }
                return;
            }
        }
        let fk = (start, spec.to_string(), key.to_string());
        for m in self.fixed.values_mut() {
            if let Some(e) = m.get_mut(&fk) {
                if e.remove(partition) {
                    m.remove(&fk);
                }
                return;
            }
        }
    }

    /// The minimum watermark over input partitions that reported one.
    pub fn global_watermark(&self) -> Option<i64> {
        self.progress.values().filter_map(|p| p.watermark).min()
    }

    pub fn as_of(&self) -> AsOf {
        AsOf {
            watermark: self.global_watermark(),
            partitions: self.progress.values().cloned().collect(),
        }
    }

    /// Final: every partial final and, for fixed windows, every input
    /// partition's watermark past the close.
    fn is_final(&self, e: &Entry, global_wm: Option<i64>) -> bool {
        e.all_final
            && (&*e.head.kind == "session"
                || global_wm.is_some_and(|w| w >= e.head.end.saturating_add(self.grace_ms)))
    }

    /// `wm`: the global watermark, computed once per query.
    fn merged(&self, e: &Entry, wm: Option<i64>) -> WindowView {
        let mut agg = WireAgg::default();
        for (_, p) in &e.partials {
            agg.merge(&p.agg);
        }
        let h = &e.head;
        WindowView {
            window_id: h.window_id(),
            spec: h.spec.to_string(),
            kind: h.kind.to_string(),
            by: h.by.to_string(),
            key: h.key.to_string(),
            start: h.start,
            end: h.end,
            is_final: self.is_final(e, wm),
            partitions: e.partials.iter().map(|(p, _)| *p).collect(),
            count: agg.count,
            revenue_usd: usd(agg.revenue_usd_micros),
            revenue_by_currency: agg
                .revenue_by_currency
                .iter()
                .map(|(c, m)| (c.to_string(), *m as f64 / MICROS as f64))
                .collect(),
            unique_customers: agg.unique_customers as usize,
            avg_usd: agg.avg_usd(),
            min_usd: agg.min_usd(),
            max_usd: agg.max_usd(),
            p95_usd: agg.p95_usd(),
        }
    }

    /// The (kind, by) pairs that have windows.
    pub fn kinds(&self) -> BTreeSet<(String, String)> {
        let mut s: BTreeSet<(String, String)> = self.fixed.keys().cloned().collect();
        if !self.sessions.is_empty() {
            s.insert(("session".into(), "customer".into()));
        }
        s
    }

    /// Merged windows matching `q`, sorted by start then key.
    pub fn windows(&self, q: &WindowQuery) -> Vec<WindowView> {
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let wm = self.global_watermark();
        let keep = |w: &WindowView| {
            q.key.as_ref().is_none_or(|k| &w.key == k) && q.is_final.is_none_or(|f| w.is_final == f)
        };
        let mut out = Vec::new();
        if q.kind == "session" {
            let lists: Vec<&Vec<Entry>> = match &q.key {
                Some(k) => self.sessions.get(k.as_str()).into_iter().collect(),
                None => self.sessions.values().collect(),
            };
            for list in lists {
                for e in list {
                    if q.from.is_some_and(|f| e.head.start < f)
                        || q.to.is_some_and(|t| e.head.start >= t)
                    {
                        continue;
                    }
                    let w = self.merged(e, wm);
                    if keep(&w) {
                        out.push(w);
                    }
                }
            }
            out.sort_by(|a, b| (a.start, &a.key).cmp(&(b.start, &b.key)));
            out.truncate(limit);
            return out;
        }
        let Some(m) = self.fixed.get(&(q.kind.clone(), q.by.clone())) else {
            return out;
        };
        let lo = (q.from.unwrap_or(i64::MIN), String::new(), String::new());
        for (k, e) in m.range(lo..) {
            if q.to.is_some_and(|t| k.0 >= t) || out.len() >= limit {
                break;
            }
            let w = self.merged(e, wm);
            if keep(&w) {
                out.push(w);
            }
        }
        out
    }

    /// All sessions of one customer, oldest first.
    pub fn customer_sessions(&self, customer: &str) -> Vec<WindowView> {
        self.sessions
            .get(customer)
            .map(|m| {
                let wm = self.global_watermark();
                m.iter().map(|e| self.merged(e, wm)).collect()
            })
            .unwrap_or_default()
    }

    /// Final + live = combined revenue per key of the tumbling windows
    /// grouped `by`, for windows starting in [from, to).
    pub fn revenue_split(
        &self,
        by: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> BTreeMap<String, Split> {
        let mut sums: BTreeMap<&str, (i128, i128, u64, u64)> = BTreeMap::new();
        let wm = self.global_watermark();
        if let Some(m) = self.fixed.get(&("tumbling".to_string(), by.to_string())) {
            let lo = (from.unwrap_or(i64::MIN), String::new(), String::new());
            for (k, e) in m.range(lo..) {
                if to.is_some_and(|t| k.0 >= t) {
                    break;
                }
                let s = sums.entry(&*e.head.key).or_default();
                if self.is_final(e, wm) {
                    s.0 += e.revenue_micros;
                    s.2 += e.count;
                } else {
                    s.1 += e.revenue_micros;
                    s.3 += e.count;
                }
            }
        }
        sums.into_iter()
            .map(|(k, (f, l, fc, lc))| {
                let split = Split {
                    final_usd: usd(f),
                    live_usd: usd(l),
                    combined_usd: usd(f + l),
                    final_orders: fc,
                    live_orders: lc,
                };
                (k.to_string(), split)
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::too_many_arguments)]
mod tests {
    use super::*;
    use crate::core::{
        Aggregate, Currency, GroupBy, WindowKey, WindowKind, WindowRow, WindowUpdate,
    };

    fn update(
        p: Partition,
        spec: &str,
        kind: WindowKind,
        group: &str,
        start: i64,
        end: i64,
        usd: i64,
        closed: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut agg = Aggregate::default();
        agg.add(
            usd,
            Currency::parse("USD").unwrap(),
            usd,
            crate::core::customer_hash(group),
        );
        let w = WindowUpdate {
            partition: p,
            spec_name: spec.into(),
            kind,
            by: if matches!(kind, WindowKind::Session { .. }) {
                GroupBy::Customer
            } else {
                GroupBy::Currency
            },
            key: WindowKey {
                spec: 0,
                group: group.into(),
                start,
            },
            row: WindowRow {
                end,
                agg,
                offset: 1,
                closed,
            },
        };
        let rec = WindowRecord::from_update(&w);
        (
            WindowRecord::record_key(&rec.window_id, p).into_bytes(),
            serde_json::to_vec(&rec).unwrap(),
        )
    }

    fn progress(v: &mut View, p: Partition, wm: i64) {
        let r = ProgressRecord {
            partition: p,
            next_offset: 10,
            watermark: Some(wm),
            idle: false,
        };
        v.apply(
            ProgressRecord::key(p).as_bytes(),
            Some(&serde_json::to_vec(&r).unwrap()),
        )
        .unwrap();
    }

    const T: WindowKind = WindowKind::Tumbling { size_ms: 60_000 };

    #[test]
    fn partials_merge_and_final_waits_for_every_partition() {
        let mut v = View::new(10_000);
        let (k0, v0) = update(0, "t", T, "USD", 0, 60_000, 5_000_000, true);
        let (k1, v1) = update(1, "t", T, "USD", 0, 60_000, 7_000_000, false);
        v.apply(&k0, Some(&v0)).unwrap();
        v.apply(&k1, Some(&v1)).unwrap();
        progress(&mut v, 0, 80_000);
        progress(&mut v, 1, 50_000);
        let q = WindowQuery {
            kind: "tumbling".into(),
            by: "currency".into(),
            ..Default::default()
        };
        let w = &v.windows(&q)[0];
        assert_eq!((w.count, w.revenue_usd, w.is_final), (2, 12.0, false));
        let (k1, v1) = update(1, "t", T, "USD", 0, 60_000, 7_000_000, true);
        v.apply(&k1, Some(&v1)).unwrap();
        assert!(
            !v.windows(&q)[0].is_final,
            "partition 1's watermark has not passed the close"
        );
        progress(&mut v, 1, 70_000);
        assert!(v.windows(&q)[0].is_final);
        let split = v.revenue_split("currency", None, None);
        assert_eq!(split["USD"].final_usd, 12.0);
        assert_eq!(split["USD"].combined_usd, 12.0);
    }

    #[test]
    fn a_final_is_sticky_and_a_tombstone_removes_a_session() {
        let mut v = View::new(0);
        let (k, fin) = update(0, "t", T, "USD", 0, 60_000, 5_000_000, true);
        let (_, live) = update(0, "t", T, "USD", 0, 60_000, 1_000_000, false);
        v.apply(&k, Some(&fin)).unwrap();
        v.apply(&k, Some(&live)).unwrap();
        progress(&mut v, 0, 100_000);
        let q = WindowQuery {
            kind: "tumbling".into(),
            by: "currency".into(),
            ..Default::default()
        };
        assert_eq!(v.windows(&q)[0].revenue_usd, 5.0);
        let s = WindowKind::Session { gap_ms: 1000 };
        let (sk, sv) = update(2, "s", s, "c1", 5, 9, 3_000_000, false);
        v.apply(&sk, Some(&sv)).unwrap();
        assert_eq!(v.customer_sessions("c1").len(), 1);
        v.apply(&sk, None).unwrap();
        assert!(v.customer_sessions("c1").is_empty());
        // A key may hold the separator; the id is split at its first and
        // last `|`.
        let (sk, sv) = update(1, "s", s, "a|b", 5, 9, 3_000_000, false);
        v.apply(&sk, Some(&sv)).unwrap();
        assert_eq!(v.customer_sessions("a|b")[0].window_id, "s|a|b|5");
        v.apply(&sk, None).unwrap();
        assert!(v.customer_sessions("a|b").is_empty());
        // A tombstone for a fixed window removes it too.
        v.apply(&k, None).unwrap();
        assert!(v.windows(&q).is_empty());
    }

    #[test]
    fn queries_filter_by_range_key_and_final() {
        let mut v = View::new(0);
        for (i, cur) in ["EUR", "USD"].iter().enumerate() {
            for m in 0..5 {
                let (k, val) = update(
                    0,
                    "t",
                    T,
                    cur,
                    m * 60_000,
                    (m + 1) * 60_000,
                    1_000_000 * (i as i64 + 1),
                    m < 3,
                );
                v.apply(&k, Some(&val)).unwrap();
            }
        }
        progress(&mut v, 0, 200_000);
        let q = |from, to, key: Option<&str>, fin| WindowQuery {
            kind: "tumbling".into(),
            by: "currency".into(),
            key: key.map(String::from),
            from,
            to,
            is_final: fin,
            limit: 0,
        };
        assert_eq!(v.windows(&q(None, None, None, None)).len(), 10);
        assert_eq!(
            v.windows(&q(Some(60_000), Some(180_000), None, None)).len(),
            4
        );
        assert_eq!(v.windows(&q(None, None, Some("USD"), None)).len(), 5);
        assert_eq!(v.windows(&q(None, None, None, Some(true))).len(), 6);
        assert!(v.apply(b"no-partition", Some(b"{}")).is_err());
        assert!(v.apply(b"t|USD|0|p0", Some(b"nope")).is_err());
    }
}
