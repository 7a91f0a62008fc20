//! A mergeable quantile sketch (DDSketch, Masson et al., VLDB 2019).
//!
//! **Error bound.** For any quantile `q`, the returned value `v̂` satisfies
//! `|v̂ − v| ≤ α·v`, where `v` is the exact value at rank `⌊q·(n−1)⌋` of the
//! sorted inputs and `α` = [`RELATIVE_ACCURACY`] (1 %).
//!
//! **Merge law.** Buckets are integer counts keyed by `⌈log_γ v⌉`, so
//! `merge(sketch(A), sketch(B)) == sketch(A ∪ B)` exactly, in any order and
//! any grouping: the sketch is a commutative monoid.
//!
//! Why not a crate: `sketches-ddsketch` keeps a dense store of at least 128
//! bins plus its config in every sketch. tally keeps one sketch per open
//! window and per customer session (a million of them is a normal load), so
//! the store here is sparse: a sorted list of `(bucket, count)` that holds one
//! entry for a session with one order.

use base64::Engine as _;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

/// α: the relative accuracy of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// γ = (1 + α) / (1 − α).
fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuantileSketch {
    /// Values ≤ 0 (an amount that rounded to zero micro-dollars).
    zeros: u64,
    /// Sorted by bucket key; counts are never zero.
    bins: Vec<(i32, u64)>,
}

impl QuantileSketch {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(value: f64) -> i32 {
        (value.ln() / gamma().ln()).ceil() as i32
    }

    /// The representative of bucket `k`: within α of every value in it.
    fn value_of(key: i32) -> f64 {
        let g = gamma();
        2.0 * g.powi(key) / (g + 1.0)
    }

    pub fn insert(&mut self, value: f64) {
        self.insert_n(value, 1);
    }

    fn insert_n(&mut self, value: f64, n: u64) {
        if value <= 0.0 || !value.is_finite() {
            self.zeros += n;
            return;
        }
        let key = Self::key(value);
        match self.bins.binary_search_by_key(&key, |b| b.0) {
            Ok(i) => self.bins[i].1 += n,
            Err(i) => {
                super::vecs::first_of_many(&mut self.bins);
                self.bins.insert(i, (key, n))
            }
        }
    }

    /// Drops spare capacity (a sketch decoded from JSON grows by pushes).
    pub fn shrink_to_fit(&mut self) {
        self.bins.shrink_to_fit();
    }

    pub fn count(&self) -> u64 {
        self.zeros + self.bins.iter().map(|b| b.1).sum::<u64>()
    }

    /// Adds every value of `other`. Commutative and associative.
    pub fn merge(&mut self, other: &QuantileSketch) {
        self.zeros += other.zeros;
        if other.bins.is_empty() {
            return;
        }
        if self.bins.is_empty() {
            self.bins.clone_from(&other.bins);
            return;
        }
        let mut out = Vec::with_capacity(self.bins.len() + other.bins.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.bins, &other.bins);
        while i < a.len() && j < b.len() {
            match a[i].0.cmp(&b[j].0) {
                std::cmp::Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    out.push((a[i].0, a[i].1 + b[j].1));
                    i += 1;
                    j += 1;
                }
            }
        }
        out.extend_from_slice(&a[i..]);
        out.extend_from_slice(&b[j..]);
        self.bins = out;
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) within the error bound, or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = (q * (n - 1) as f64).floor() as u64;
        if rank < self.zeros {
            return Some(0.0);
        }
        let mut seen = self.zeros;
        for &(key, c) in &self.bins {
            seen += c;
            if seen > rank {
                return Some(Self::value_of(key));
            }
        }
        self.bins.last().map(|b| Self::value_of(b.0))
    }

    /// The `(bucket, count)` pairs, sorted by bucket.
    pub fn bins(&self) -> &[(i32, u64)] {
        &self.bins
    }

    /// Number of stored buckets (memory is proportional to it).
    pub fn buckets(&self) -> usize {
        self.bins.len()
    }
}

/// The sketch as binary formats store it (postcard: RocksDB rows, the
/// changelog, the view's shelf): the fields as they are, so those bytes
/// are what they were before the packed JSON form
/// (`state_codec::todays_encoding_is_pinned`).
#[derive(Serialize)]
struct RawRef<'a> {
    zeros: u64,
    bins: &'a [(i32, u64)],
}

#[derive(Deserialize)]
struct Raw {
    zeros: u64,
    bins: Vec<(i32, u64)>,
}

/// The sketch in a human-readable format (JSON on `revenue-windows`).
#[derive(Deserialize)]
struct Readable {
    zeros: u64,
    bins: Bins,
}

/// A sketch's bins in JSON: the packed string, or (as written before it)
/// a list of `[bucket, count]` pairs.
struct Bins(Vec<(i32, u64)>);

/// Why packed: every window result on `revenue-windows` carries its sketch,
/// and as a JSON list of pairs (hundreds of them for a busy window) it was
/// the largest part of the record: its encoding cost 2.8 % of a loaded
/// pod's CPU and the view's decoding of it 5.5 % (perf). Packed,
/// the bins are one base64 string of LEB128 varints: the first bucket
/// zigzagged, then each bucket's distance from the one before less one
/// (buckets are strictly increasing), each count less one (counts are
/// never zero). So every string that decodes is a valid sketch.
impl Serialize for QuantileSketch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return RawRef {
                zeros: self.zeros,
                bins: &self.bins,
            }
            .serialize(s);
        }
        let mut st = s.serialize_struct("QuantileSketch", 2)?;
        st.serialize_field("zeros", &self.zeros)?;
        st.serialize_field("bins", &pack(&self.bins))?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for QuantileSketch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            let Raw { zeros, bins } = Raw::deserialize(d)?;
            return Ok(QuantileSketch { zeros, bins });
        }
        let Readable { zeros, bins } = Readable::deserialize(d)?;
        Ok(QuantileSketch {
            zeros,
            bins: bins.0,
        })
    }
}

impl<'de> Deserialize<'de> for Bins {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BinsVisitor)
    }
}

struct BinsVisitor;

impl<'de> Visitor<'de> for BinsVisitor {
    type Value = Bins;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sketch's packed bins (a base64 string) or a list of [bucket, count]")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bins, E> {
        unpack(v).map(Bins).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bins, A::Error> {
        let mut bins = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element::<(i32, u64)>()? {
            bins.push(b);
        }
        Ok(Bins(bins))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, &'static str> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at).ok_or("truncated")?;
        *at += 1;
        v |= u64::from(b & 0x7f)
            .checked_shl(shift)
            .ok_or("a number too long")?;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a number too long")
}

/// The packed form of sorted bins with no zero count (see [`QuantileSketch`]'s `Serialize`).
fn pack(bins: &[(i32, u64)]) -> String {
    let mut raw = Vec::with_capacity(bins.len() * 3);
    let mut last: Option<i32> = None;
    for &(key, count) in bins {
        match last {
            None => put_varint(
                &mut raw,
                ((i64::from(key) << 1) ^ (i64::from(key) >> 63)) as u64,
            ),
            Some(prev) => put_varint(&mut raw, (i64::from(key) - i64::from(prev) - 1) as u64),
        }
        put_varint(&mut raw, count.saturating_sub(1));
        last = Some(key);
    }
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
}

fn unpack(text: &str) -> Result<Vec<(i32, u64)>, String> {
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .map_err(|e| format!("a sketch's bins are not base64: {e}"))?;
    let bad = |why: &str| format!("a sketch's packed bins: {why}");
    let mut bins = Vec::with_capacity(raw.len() / 2);
    let mut at = 0;
    let mut last: Option<i32> = None;
    while at < raw.len() {
        let v = get_varint(&raw, &mut at).map_err(bad)?;
        let key = match last {
            None => ((v >> 1) as i64) ^ -((v & 1) as i64),
            Some(prev) => i64::from(prev)
                .checked_add(v as i64)
                .and_then(|k| k.checked_add(1))
                .ok_or_else(|| bad("a bucket out of range"))?,
        };
        let key = i32::try_from(key).map_err(|_| bad("a bucket out of range"))?;
        let count = get_varint(&raw, &mut at)
            .map_err(bad)?
            .checked_add(1)
            .ok_or_else(|| bad("a count out of range"))?;
        bins.push((key, count));
        last = Some(key);
    }
    Ok(bins)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &[f64], q: f64) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        v[(q * (v.len() - 1) as f64).floor() as usize]
    }

    #[test]
    fn quantiles_are_within_the_bound() {
        let values: Vec<f64> = (1..=10_000).map(|i| (i as f64) * 1.37).collect();
        let mut s = QuantileSketch::new();
        values.iter().for_each(|v| s.insert(*v));
        for q in [0.0, 0.5, 0.95, 0.99, 1.0] {
            let (est, truth) = (s.quantile(q).unwrap(), exact(&values, q));
            assert!(
                (est - truth).abs() <= RELATIVE_ACCURACY * truth * (1.0 + 1e-9),
                "q={q}: {est} vs {truth}"
            );
        }
    }

    #[test]
    fn merge_equals_inserting_everything() {
        let (mut a, mut b, mut all) = (
            QuantileSketch::new(),
            QuantileSketch::new(),
            QuantileSketch::new(),
        );
        for i in 0..500 {
            let v = (i % 97) as f64 + 0.5;
            if i % 3 == 0 {
                a.insert(v)
            } else {
                b.insert(v)
            }
            all.insert(v);
        }
        a.insert(0.0);
        all.insert(0.0);
        let mut ab = a.clone();
        ab.merge(&b);
        assert_eq!(ab, all);
        b.merge(&a);
        assert_eq!(b, all);
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(QuantileSketch::new().quantile(0.95), None);
    }

    fn sketch(values: &[f64]) -> QuantileSketch {
        let mut s = QuantileSketch::new();
        values.iter().for_each(|v| s.insert(*v));
        s
    }

    #[test]
    fn json_packs_the_bins_and_reads_them_back() {
        let s = sketch(&[0.0, 1e-9, 0.5, 1.0, 12.5, 12.6, 999.0, 1e9, 1e12]);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.starts_with(r#"{"zeros":1,"bins":""#), "{text}");
        assert_eq!(serde_json::from_str::<QuantileSketch>(&text).unwrap(), s);
        let empty = serde_json::to_string(&QuantileSketch::new()).unwrap();
        assert_eq!(empty, r#"{"zeros":0,"bins":""}"#);
        assert_eq!(
            serde_json::from_str::<QuantileSketch>(&empty).unwrap(),
            QuantileSketch::new()
        );
    }

    #[test]
    fn json_still_reads_the_list_of_pairs() {
        let s: QuantileSketch =
            serde_json::from_str(r#"{"zeros":2,"bins":[[-3,1],[7,4]]}"#).unwrap();
        assert_eq!(
            s,
            QuantileSketch {
                zeros: 2,
                bins: vec![(-3, 1), (7, 4)]
            }
        );
    }

    #[test]
    fn bad_packed_bins_are_an_error_that_says_so() {
        for bad in ["%%%", "gA", "/////////////w"] {
            let e =
                serde_json::from_str::<QuantileSketch>(&format!(r#"{{"zeros":0,"bins":"{bad}"}}"#))
                    .unwrap_err()
                    .to_string();
            assert!(e.contains("sketch's"), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        /// Any valid bins (sorted, unique buckets, counts ≥ 1) survive the
        /// packed form, at the extremes of both ranges too.
        #[test]
        fn packing_round_trips(
            keys in proptest::collection::btree_set(proptest::prop_oneof![proptest::num::i32::ANY, -50i32..50], 0..60),
            counts in proptest::collection::vec(proptest::prop_oneof![1u64..3, 1u64..=u64::MAX], 60),
        ) {
            let bins: Vec<(i32, u64)> = keys.into_iter().zip(counts).collect();
            proptest::prop_assert_eq!(unpack(&pack(&bins)).unwrap(), bins);
        }
    }
}
