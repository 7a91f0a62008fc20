//! `revenue-windows`: every input partition publishes its own partial of a
//! window as a [`WindowRecord`] keyed `window_id|p<partition>`; a retracted
//! session is a tombstone (no value); `__progress|p<partition>` rows carry
//! a partition's progress ([`ProgressRecord`]). This module is the format:
//! it encodes what the pod publishes and decodes it into the core's
//! [`ViewUpdate`] for the view.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use tally_core::aggregate::{usd, PartialAgg};
use tally_core::view::{ViewUpdate, WindowPartial};
use tally_core::{Partition, WindowUpdate};

/// Key prefix of progress rows on `revenue-windows`.
pub const PROGRESS_PREFIX: &str = "__progress|p";

/// The key of an input partition's progress row.
pub fn progress_key(partition: Partition) -> String {
    format!("{PROGRESS_PREFIX}{partition}")
}

/// A record on `revenue-windows` that is not of its format.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("record key is not UTF-8")]
    Key,
    #[error("record key {0:?} names no partition")]
    NoPartition(String),
    #[error("record {key:?} is not a window row: {message}")]
    Value { key: String, message: String },
}

/// A window result as published on `revenue-windows`. `agg` carries the
/// mergeable aggregate so any reader can combine partitions exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub window_id: String,
    pub spec: String,
    pub kind: String,
    pub by: String,
    pub key: String,
    pub start: i64,
    pub end: i64,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub partition: Partition,
    pub offset: i64,
    pub count: u64,
    pub revenue_usd: f64,
    pub revenue_usd_micros: i128,
    pub revenue_by_currency: Map<String, Value>,
    pub unique_customers: usize,
    pub avg_usd: Option<f64>,
    pub min_usd: Option<f64>,
    pub max_usd: Option<f64>,
    pub p95_usd: Option<f64>,
    pub agg: PartialAgg,
    /// The writer's ownership epoch of the input partition (0: written
    /// before epochs). The view ignores a row of an older epoch than one
    /// it already applied for the same key: a stale writer's.
    #[serde(default)]
    pub epoch: u64,
}

impl WindowRecord {
    /// The record key: one row per window and input partition.
    pub fn record_key(window_id: &str, partition: Partition) -> String {
        format!("{window_id}|p{partition}")
    }
}

/// A [`WindowRecord`] as the pod writes it, borrowed from the update: the
/// same fields in the same order, so the same bytes
/// (`tests::the_borrowed_record_writes_the_same_bytes`). Why: building a
/// `WindowRecord` for every result cost owned copies of the names, a map
/// of JSON values for the per-currency revenue and a copy of the
/// aggregate with its sketch, all to be serialized once and dropped
/// (encoding window results was 8.5 % of a loaded pod's CPU).
#[derive(Serialize)]
struct RecordOut<'a> {
    window_id: &'a str,
    spec: &'a str,
    kind: &'static str,
    by: &'static str,
    key: &'a str,
    start: i64,
    end: i64,
    #[serde(rename = "final")]
    is_final: bool,
    partition: Partition,
    offset: i64,
    count: u64,
    revenue_usd: f64,
    revenue_usd_micros: i128,
    revenue_by_currency: ByCurrency<'a>,
    unique_customers: usize,
    avg_usd: Option<f64>,
    min_usd: Option<f64>,
    max_usd: Option<f64>,
    p95_usd: Option<f64>,
    agg: AggOut<'a>,
    epoch: u64,
}

/// `PartialAgg` as it serializes, borrowed.
#[derive(Serialize)]
struct AggOut<'a> {
    count: u64,
    revenue_usd_micros: i128,
    revenue_by_currency: &'a [(tally_core::Currency, i128)],
    min_usd_micros: i64,
    max_usd_micros: i64,
    unique_customers: u64,
    sketch: &'a tally_core::sketch::QuantileSketch,
}

/// Revenue per currency in dollars, as a JSON object sorted by code.
struct ByCurrency<'a>(&'a [(tally_core::Currency, i128)]);

impl Serialize for ByCurrency<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // `Aggregate` keeps its currencies sorted, and a code's bytes sort
        // as its text: the order `serde_json::Map` writes.
        s.collect_map(self.0.iter().map(|(c, m)| (c.as_str(), usd(*m))))
    }
}

/// The key and the value of a window result on `revenue-windows`, as the
/// pod writes it, stamped with the writer's ownership `epoch`.
pub fn encode(w: &WindowUpdate, epoch: u64) -> (String, Vec<u8>) {
    let id = w.window_id();
    let value = serde_json::to_vec(&RecordOut::new(w, &id, epoch)).unwrap_or_default();
    (WindowRecord::record_key(&id, w.partition), value)
}

impl<'a> RecordOut<'a> {
    /// `window_id` is `w.window_id()`, made once by the caller for the key too.
    fn new(w: &'a WindowUpdate, window_id: &'a str, epoch: u64) -> RecordOut<'a> {
        let a = &w.row.agg;
        RecordOut {
            window_id,
            spec: &w.spec_name,
            kind: w.kind.name(),
            by: w.by.name(),
            key: &w.key.group,
            start: w.key.start,
            end: w.row.end,
            is_final: w.row.closed,
            partition: w.partition,
            offset: w.row.offset,
            count: a.count,
            revenue_usd: usd(a.revenue_usd_micros),
            revenue_usd_micros: a.revenue_usd_micros,
            revenue_by_currency: ByCurrency(&a.revenue_by_currency),
            unique_customers: a.unique_customers(),
            avg_usd: a.avg_usd_micros().map(|m| usd(m.into())),
            min_usd: a.min_usd().map(|m| usd(m.into())),
            max_usd: a.max_usd().map(|m| usd(m.into())),
            p95_usd: a.p95_usd(),
            agg: AggOut {
                count: a.count,
                revenue_usd_micros: a.revenue_usd_micros,
                revenue_by_currency: &a.revenue_by_currency,
                min_usd_micros: a.min_usd_micros,
                max_usd_micros: a.max_usd_micros,
                unique_customers: a.unique_customers() as u64,
                sketch: &a.sketch,
            },
            epoch,
        }
    }
}

/// What the view reads of a [`WindowRecord`]: the fields it keeps. The
/// others are skipped as they are parsed, not built: decoding whole
/// records (the per-currency map of values, the id, the display figures)
/// was about a third of the view thread's decoding in a profile of the
/// loaded scenario.
#[derive(Deserialize)]
struct ViewRow {
    spec: String,
    kind: String,
    by: String,
    key: String,
    start: i64,
    end: i64,
    #[serde(rename = "final")]
    is_final: bool,
    #[serde(default)]
    epoch: u64,
    agg: PartialAgg,
}

impl ViewRow {
    fn into_partial(self) -> WindowPartial {
        WindowPartial {
            spec: self.spec,
            kind: self.kind,
            by: self.by,
            key: self.key,
            start: self.start,
            end: self.end,
            is_final: self.is_final,
            epoch: self.epoch,
            agg: self.agg,
        }
    }
}

/// Decodes one `revenue-windows` record (`None`: a tombstone).
pub fn decode(key: &[u8], payload: Option<&[u8]>) -> Result<ViewUpdate, DecodeError> {
    let value_err = |e: serde_json::Error| DecodeError::Value {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    };
    if key.starts_with(PROGRESS_PREFIX.as_bytes()) {
        return match payload {
            Some(p) => Ok(ViewUpdate::Progress(
                serde_json::from_slice(p).map_err(value_err)?,
            )),
            None => Ok(ViewUpdate::Nothing),
        };
    }
    let (id, partition) = parse_key(key)?;
    match payload {
        None => Ok(ViewUpdate::Tombstone(id, partition)),
        Some(p) => {
            let rec: ViewRow = serde_json::from_slice(p).map_err(value_err)?;
            // Decoded from JSON by pushes, the vectors have spare room; a
            // million sessions are held in the view.
            let mut partial = rec.into_partial();
            partial.agg.revenue_by_currency.shrink_to_fit();
            partial.agg.sketch.shrink_to_fit();
            Ok(ViewUpdate::Window(partition, Box::new(partial)))
        }
    }
}

fn parse_key(key: &[u8]) -> Result<(String, Partition), DecodeError> {
    let k = std::str::from_utf8(key).map_err(|_| DecodeError::Key)?;
    let (id, p) = k
        .rsplit_once("|p")
        .ok_or_else(|| DecodeError::NoPartition(k.to_string()))?;
    let p = p
        .parse()
        .map_err(|_| DecodeError::NoPartition(k.to_string()))?;
    Ok((id.to_string(), p))
}

#[cfg(test)]
#[allow(clippy::too_many_arguments)]
mod tests {
    use super::*;
    use tally_core::view::{ProgressRecord, View, WindowQuery};
    use tally_core::{Aggregate, Currency, GroupBy, WindowKey, WindowKind, WindowRow};

    /// Decodes and applies, as the follower does.
    fn apply(v: &mut View, key: &[u8], payload: Option<&[u8]>) -> Result<(), DecodeError> {
        v.apply(decode(key, payload)?);
        Ok(())
    }

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
            tally_core::customer_hash(group),
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
        let (key, value) = encode(&w, 0);
        (key.into_bytes(), value)
    }

    /// The view reads what it keeps of a record, whatever form its
    /// sketch's bins take (packed now, a list of pairs from an older
    /// version), and skips the rest: the same partial either way.
    #[test]
    fn the_view_reads_packed_and_listed_sketches_alike() {
        let tumbling = WindowKind::Tumbling { size_ms: 60_000 };
        let (key, packed) = update(0, "t", tumbling, "USD", 0, 60_000, 12_500_000, false);
        let a = decode(&key, Some(&packed)).unwrap();
        let ViewUpdate::Window(_, partial) = &a else {
            panic!("{a:?}")
        };
        let mut v: serde_json::Value = serde_json::from_slice(&packed).unwrap();
        assert!(v["agg"]["sketch"]["bins"].is_string(), "{v}");
        v["agg"]["sketch"]["bins"] = serde_json::json!(partial.agg.sketch.bins());
        assert!(v["agg"]["sketch"]["bins"][0].is_array(), "{v}");
        let listed = serde_json::to_vec(&v).unwrap();
        assert_eq!(decode(&key, Some(&listed)).unwrap(), a);
    }

    /// The reference for `RecordOut`: the owned record built field by
    /// field from the update, as the pod wrote it before (`usd`, the map
    /// of JSON values, `PartialAgg::from`).
    fn owned_record(w: &WindowUpdate) -> WindowRecord {
        let a = &w.row.agg;
        WindowRecord {
            window_id: w.window_id(),
            spec: w.spec_name.clone(),
            kind: w.kind.name().to_string(),
            by: w.by.name().to_string(),
            key: w.key.group.clone(),
            start: w.key.start,
            end: w.row.end,
            is_final: w.row.closed,
            partition: w.partition,
            offset: w.row.offset,
            count: a.count,
            revenue_usd: usd(a.revenue_usd_micros),
            revenue_usd_micros: a.revenue_usd_micros,
            revenue_by_currency: a
                .revenue_by_currency
                .iter()
                .map(|(c, m)| (c.to_string(), Value::from(usd(*m))))
                .collect(),
            unique_customers: a.unique_customers(),
            avg_usd: a.avg_usd_micros().map(|m| usd(m.into())),
            min_usd: a.min_usd().map(|m| usd(m.into())),
            max_usd: a.max_usd().map(|m| usd(m.into())),
            p95_usd: a.p95_usd(),
            agg: PartialAgg::from(a),
            epoch: 0,
        }
    }

    /// The pod's borrowed record is byte for byte the `WindowRecord` it
    /// stands for, for open and final results, sessions, several
    /// currencies in any order of arrival, and an empty aggregate. Seen to
    /// fail with two of `RecordOut`'s fields swapped.
    #[test]
    fn the_borrowed_record_writes_the_same_bytes() {
        let kinds = [
            WindowKind::Tumbling { size_ms: 60_000 },
            WindowKind::Session { gap_ms: 1_800_000 },
        ];
        let amounts: [&[(&str, i64)]; 4] = [
            &[],
            &[("USD", 12_500_000)],
            &[
                ("JPY", 1_000_000_000),
                ("EUR", 3_333_333),
                ("USD", 1),
                ("GBP", 999_999_999_999),
            ],
            &[("EUR", 5), ("EUR", 7_000_000), ("CHF", 42_000_000)],
        ];
        for kind in kinds {
            for list in amounts {
                for closed in [false, true] {
                    let mut agg = Aggregate::default();
                    for (n, (cur, micros)) in list.iter().enumerate() {
                        let c = Currency::parse(cur).unwrap();
                        agg.add(*micros, c, *micros / 2 + 1, n as u64 * 7919);
                    }
                    let w = WindowUpdate {
                        partition: 3,
                        spec_name: "s".into(),
                        kind,
                        by: GroupBy::Currency,
                        key: WindowKey {
                            spec: 0,
                            group: "g \"q\"".into(),
                            start: -5,
                        },
                        row: WindowRow {
                            end: 60_000,
                            agg,
                            offset: 17,
                            closed,
                        },
                    };
                    let mut rec = owned_record(&w);
                    rec.epoch = 9;
                    let id = w.window_id();
                    assert_eq!(
                        String::from_utf8(serde_json::to_vec(&RecordOut::new(&w, &id, 9)).unwrap())
                            .unwrap(),
                        String::from_utf8(serde_json::to_vec(&rec).unwrap()).unwrap(),
                    );
                }
            }
        }
    }

    fn progress(v: &mut View, p: Partition, wm: i64) {
        let r = ProgressRecord {
            partition: p,
            next_offset: 10,
            watermark: Some(wm),
            idle: false,
            epoch: 0,
        };
        apply(
            v,
            progress_key(p).as_bytes(),
            Some(&serde_json::to_vec(&r).unwrap()),
        )
        .unwrap();
    }

    const T: WindowKind = WindowKind::Tumbling { size_ms: 60_000 };

    #[test]
    fn partials_merge_and_final_waits_for_every_partition() {
        let mut v = View::new(10_000);
        v.set_input_partitions(2);
        let (k0, v0) = update(0, "t", T, "USD", 0, 60_000, 5_000_000, true);
        let (k1, v1) = update(1, "t", T, "USD", 0, 60_000, 7_000_000, false);
        apply(&mut v, &k0, Some(&v0)).unwrap();
        apply(&mut v, &k1, Some(&v1)).unwrap();
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
        apply(&mut v, &k1, Some(&v1)).unwrap();
        assert!(
            !v.windows(&q)[0].is_final,
            "partition 1's watermark has not passed the close"
        );
        progress(&mut v, 1, 70_000);
        assert!(v.windows(&q)[0].is_final);
        let split = v.revenue_split("currency", "t", None, None);
        assert_eq!(split["USD"].final_usd, 12.0);
        assert_eq!(split["USD"].combined_usd, 12.0);
    }

    #[test]
    fn a_final_is_sticky_and_a_tombstone_removes_a_session_not_a_window() {
        let mut v = View::new(0);
        v.set_input_partitions(1);
        let (k, fin) = update(0, "t", T, "USD", 0, 60_000, 5_000_000, true);
        let (_, live) = update(0, "t", T, "USD", 0, 60_000, 1_000_000, false);
        apply(&mut v, &k, Some(&fin)).unwrap();
        apply(&mut v, &k, Some(&live)).unwrap();
        progress(&mut v, 0, 100_000);
        let q = WindowQuery {
            kind: "tumbling".into(),
            by: "currency".into(),
            ..Default::default()
        };
        assert_eq!(v.windows(&q)[0].revenue_usd, 5.0);
        let s = WindowKind::Session { gap_ms: 1000 };
        let (sk, sv) = update(2, "s", s, "c1", 5, 9, 3_000_000, false);
        apply(&mut v, &sk, Some(&sv)).unwrap();
        assert_eq!(v.customer_sessions("c1").len(), 1);
        apply(&mut v, &sk, None).unwrap();
        assert!(v.customer_sessions("c1").is_empty());
        // A key may hold the separator; the id is split at its first and
        // last `|`.
        let (sk, sv) = update(1, "s", s, "a|b", 5, 9, 3_000_000, false);
        apply(&mut v, &sk, Some(&sv)).unwrap();
        assert_eq!(v.customer_sessions("a|b")[0].window_id, "s|a|b|5");
        apply(&mut v, &sk, None).unwrap();
        assert!(v.customer_sessions("a|b").is_empty());
        // A tombstone for a fixed window is one partition's expiry: the
        // view keeps the window whole until its own retention drops it
        // (crates/core/tests/retention.rs), so no total shrinks.
        apply(&mut v, &k, None).unwrap();
        assert_eq!(v.windows(&q)[0].revenue_usd, 5.0);
    }

    #[test]
    fn queries_filter_by_range_key_and_final() {
        let mut v = View::new(0);
        v.set_input_partitions(1);
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
                apply(&mut v, &k, Some(&val)).unwrap();
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
            spec: None,
        };
        assert_eq!(v.windows(&q(None, None, None, None)).len(), 10);
        assert_eq!(
            v.windows(&q(Some(60_000), Some(180_000), None, None)).len(),
            4
        );
        assert_eq!(v.windows(&q(None, None, Some("USD"), None)).len(), 5);
        assert_eq!(v.windows(&q(None, None, None, Some(true))).len(), 6);
        assert!(apply(&mut v, b"no-partition", Some(b"{}")).is_err());
        assert!(apply(&mut v, b"t|USD|0|p0", Some(b"nope")).is_err());
    }
}
