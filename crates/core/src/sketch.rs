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

use serde::{Deserialize, Serialize};

/// α: the relative accuracy of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// γ = (1 + α) / (1 − α).
fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Number of stored buckets (memory is proportional to it).
    pub fn buckets(&self) -> usize {
        self.bins.len()
    }
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
}
