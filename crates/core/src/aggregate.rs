//! The mergeable aggregate of one window.
//!
//! **Law.** `Aggregate` is a commutative monoid under [`Aggregate::merge`]
//! with [`Aggregate::default`] as identity, and `merge` agrees with `add`:
//! folding any split of a set of orders into separate aggregates and merging
//! them gives the aggregate of the whole set. This is what lets the serving
//! layer combine partial results from different input partitions.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::order::{Currency, MICROS};
use super::sketch::QuantileSketch;
pub(crate) use super::vecs::first_of_many;

/// A stable 64-bit hash of a customer id (FNV-1a). Stable across processes
/// and versions, because it is stored in state and in the changelog. With 64
/// bits, a window with a million distinct customers has a collision chance
/// of about 3·10⁻⁸, so "unique customers" is exact in practice.
pub fn customer_hash(customer_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in customer_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The hashes are already uniform, so hashing them again is wasted work.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type IdSet = HashSet<u64, BuildHasherDefault<IdentityHasher>>;

/// Distinct customers. Small sets (a session has one customer) stay a sorted
/// vector; large ones become a hash set. Serialised as a sorted list either way.
///
/// A large set is shared copy-on-write (`Arc`): every flush hands each
/// touched window's row to the shell twice (its update and its state row),
/// and a busy window holds tens of thousands of customers. Those copies are
/// dropped before the next record, so the next insert finds the set
/// unshared and changes it in place; cloning costs a reference count.
#[derive(Clone, Debug)]
pub enum CustomerSet {
    Small(Vec<u64>),
    Large(Arc<IdSet>),
}

const SMALL_SET: usize = 32;

impl Default for CustomerSet {
    fn default() -> Self {
        CustomerSet::Small(Vec::new())
    }
}

impl CustomerSet {
    /// Adds `h`; returns whether it was new.
    pub fn insert(&mut self, h: u64) -> bool {
        match self {
            CustomerSet::Small(v) => match v.binary_search(&h) {
                Ok(_) => false,
                Err(i) => {
                    if v.len() < SMALL_SET {
                        first_of_many(v);
                        v.insert(i, h);
                    } else {
                        let mut set: IdSet = v.iter().copied().collect();
                        set.insert(h);
                        *self = CustomerSet::Large(Arc::new(set));
                    }
                    true
                }
            },
            CustomerSet::Large(s) => !s.contains(&h) && Arc::make_mut(s).insert(h),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CustomerSet::Small(v) => v.len(),
            CustomerSet::Large(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, h: u64) -> bool {
        match self {
            CustomerSet::Small(v) => v.binary_search(&h).is_ok(),
            CustomerSet::Large(s) => s.contains(&h),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            CustomerSet::Small(v) => Box::new(v.iter().copied()),
            CustomerSet::Large(s) => Box::new(s.iter().copied()),
        }
    }

    pub fn merge(&mut self, other: &CustomerSet) {
        for h in other.iter() {
            self.insert(h);
        }
    }

    fn sorted(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.iter().collect();
        v.sort_unstable();
        v
    }
}

impl PartialEq for CustomerSet {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|h| other.contains(h))
    }
}

impl Eq for CustomerSet {}

impl Serialize for CustomerSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.sorted().serialize(s)
    }
}

impl<'de> Deserialize<'de> for CustomerSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<u64>::deserialize(d)?;
        let mut set = CustomerSet::default();
        for h in v {
            set.insert(h);
        }
        Ok(set)
    }
}

/// Revenue, count, customers, min/max/avg and p95 of one window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    pub count: u64,
    /// Sum of USD values, micro-dollars.
    pub revenue_usd_micros: i128,
    /// Sum per original currency, micro-units, sorted by currency.
    pub revenue_by_currency: Vec<(Currency, i128)>,
    /// Smallest and largest single order, micro-dollars (meaningless when empty).
    pub min_usd_micros: i64,
    pub max_usd_micros: i64,
    pub customers: CustomerSet,
    /// USD values in dollars, for p95.
    pub sketch: QuantileSketch,
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate {
            count: 0,
            revenue_usd_micros: 0,
            revenue_by_currency: Vec::new(),
            min_usd_micros: i64::MAX,
            max_usd_micros: i64::MIN,
            customers: CustomerSet::default(),
            sketch: QuantileSketch::new(),
        }
    }
}

impl Aggregate {
    /// Folds one order in; returns whether its customer is new here.
    pub fn add(
        &mut self,
        usd_micros: i64,
        currency: Currency,
        amount_micros: i64,
        customer: u64,
    ) -> bool {
        self.count += 1;
        self.revenue_usd_micros += i128::from(usd_micros);
        self.add_currency(currency, i128::from(amount_micros));
        self.min_usd_micros = self.min_usd_micros.min(usd_micros);
        self.max_usd_micros = self.max_usd_micros.max(usd_micros);
        self.sketch.insert(usd_micros as f64 / MICROS as f64);
        self.customers.insert(customer)
    }

    /// A copy without the customer set (which a window's state row stores
    /// apart, see `StateRow::Members`).
    pub fn without_customers(&self) -> Aggregate {
        Aggregate {
            count: self.count,
            revenue_usd_micros: self.revenue_usd_micros,
            revenue_by_currency: self.revenue_by_currency.clone(),
            min_usd_micros: self.min_usd_micros,
            max_usd_micros: self.max_usd_micros,
            customers: CustomerSet::default(),
            sketch: self.sketch.clone(),
        }
    }

    fn add_currency(&mut self, currency: Currency, amount: i128) {
        match self
            .revenue_by_currency
            .binary_search_by_key(&currency, |e| e.0)
        {
            Ok(i) => self.revenue_by_currency[i].1 += amount,
            Err(i) => {
                first_of_many(&mut self.revenue_by_currency);
                self.revenue_by_currency.insert(i, (currency, amount))
            }
        }
    }

    /// Adds every order of `other`. Commutative and associative.
    pub fn merge(&mut self, other: &Aggregate) {
        self.count += other.count;
        self.revenue_usd_micros += other.revenue_usd_micros;
        for (c, a) in &other.revenue_by_currency {
            self.add_currency(*c, *a);
        }
        self.min_usd_micros = self.min_usd_micros.min(other.min_usd_micros);
        self.max_usd_micros = self.max_usd_micros.max(other.max_usd_micros);
        self.customers.merge(&other.customers);
        self.sketch.merge(&other.sketch);
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn unique_customers(&self) -> usize {
        self.customers.len()
    }

    /// Mean order value, micro-dollars, rounded toward zero.
    pub fn avg_usd_micros(&self) -> Option<i64> {
        (self.count > 0).then(|| (self.revenue_usd_micros / self.count as i128) as i64)
    }

    pub fn min_usd(&self) -> Option<i64> {
        (self.count > 0).then_some(self.min_usd_micros)
    }

    pub fn max_usd(&self) -> Option<i64> {
        (self.count > 0).then_some(self.max_usd_micros)
    }

    /// p95 of order values in USD dollars, within the sketch's bound, and
    /// clamped to [min, max] (which only moves it toward the true value).
    pub fn p95_usd(&self) -> Option<f64> {
        p95_clamped(&self.sketch, self.min_usd_micros, self.max_usd_micros)
    }
}

/// The sketch's p95 in dollars, clamped to [min, max] micro-dollars (which
/// only moves it toward the true value).
pub fn p95_clamped(sketch: &QuantileSketch, min_micros: i64, max_micros: i64) -> Option<f64> {
    let q = sketch.quantile(0.95)?;
    let lo = min_micros as f64 / MICROS as f64;
    let hi = max_micros as f64 / MICROS as f64;
    Some(q.clamp(lo, hi))
}

/// Micro-units as dollars, for display only (sums stay integer).
pub fn usd(micros: i128) -> f64 {
    micros as f64 / MICROS as f64
}

/// The mergeable part of a published window result. Unlike the stored
/// aggregate it carries the number of distinct customers, not their hashes
/// (which would make a busy window's row hundreds of kilobytes).
/// **Precondition** for exact merging: `raw-orders` is keyed by
/// `customer_id` (docs/semantics.md, "Input"; the generator and the webhook do so), so each
/// customer's orders are in one input partition and the counts of different
/// partitions add up exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialAgg {
    pub count: u64,
    pub revenue_usd_micros: i128,
    pub revenue_by_currency: Vec<(Currency, i128)>,
    pub min_usd_micros: i64,
    pub max_usd_micros: i64,
    pub unique_customers: u64,
    pub sketch: QuantileSketch,
}

impl Default for PartialAgg {
    fn default() -> Self {
        PartialAgg::from(&Aggregate::default())
    }
}

impl From<&Aggregate> for PartialAgg {
    fn from(a: &Aggregate) -> Self {
        PartialAgg {
            count: a.count,
            revenue_usd_micros: a.revenue_usd_micros,
            revenue_by_currency: a.revenue_by_currency.clone(),
            min_usd_micros: a.min_usd_micros,
            max_usd_micros: a.max_usd_micros,
            unique_customers: a.unique_customers() as u64,
            sketch: a.sketch.clone(),
        }
    }
}

impl PartialAgg {
    /// Combines the partial of another input partition.
    pub fn merge(&mut self, o: &PartialAgg) {
        self.count += o.count;
        self.revenue_usd_micros += o.revenue_usd_micros;
        for (c, m) in &o.revenue_by_currency {
            match self.revenue_by_currency.binary_search_by_key(c, |e| e.0) {
                Ok(i) => self.revenue_by_currency[i].1 += m,
                Err(i) => self.revenue_by_currency.insert(i, (*c, *m)),
            }
        }
        self.min_usd_micros = self.min_usd_micros.min(o.min_usd_micros);
        self.max_usd_micros = self.max_usd_micros.max(o.max_usd_micros);
        self.unique_customers += o.unique_customers;
        self.sketch.merge(&o.sketch);
    }

    pub fn avg_usd(&self) -> Option<f64> {
        (self.count > 0).then(|| usd(self.revenue_usd_micros / self.count as i128))
    }

    pub fn min_usd(&self) -> Option<f64> {
        (self.count > 0).then(|| usd(self.min_usd_micros.into()))
    }

    pub fn max_usd(&self) -> Option<f64> {
        (self.count > 0).then(|| usd(self.max_usd_micros.into()))
    }

    pub fn p95_usd(&self) -> Option<f64> {
        p95_clamped(&self.sketch, self.min_usd_micros, self.max_usd_micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn add_tracks_every_figure() {
        let mut a = Aggregate::default();
        a.add(2_000_000, usd(), 2_000_000, customer_hash("a"));
        a.add(
            4_000_000,
            Currency::parse("EUR").unwrap(),
            3_700_000,
            customer_hash("b"),
        );
        a.add(6_000_000, usd(), 6_000_000, customer_hash("a"));
        assert_eq!(a.count, 3);
        assert_eq!(a.revenue_usd_micros, 12_000_000);
        assert_eq!(a.unique_customers(), 2);
        assert_eq!(a.avg_usd_micros(), Some(4_000_000));
        assert_eq!(
            (a.min_usd(), a.max_usd()),
            (Some(2_000_000), Some(6_000_000))
        );
        assert_eq!(a.revenue_by_currency.len(), 2);
    }

    #[test]
    fn customer_set_grows_from_small_to_large_without_changing_meaning() {
        let mut s = CustomerSet::default();
        for i in 0..100u64 {
            s.insert(i * 7);
            s.insert(i * 7);
        }
        assert!(matches!(s, CustomerSet::Large(_)));
        assert_eq!(s.len(), 100);
        let round: CustomerSet = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(round, s);
    }

    #[test]
    fn a_one_order_aggregate_holds_no_spare_room() {
        // A million open sessions are one-order aggregates: a Vec's usual
        // first capacity of four was most of their memory.
        let mut a = Aggregate::default();
        a.add(1_000_000, usd(), 1_000_000, customer_hash("a"));
        assert_eq!(a.revenue_by_currency.capacity(), 1);
        assert!(matches!(&a.customers, CustomerSet::Small(v) if v.capacity() == 1));
        a.add(
            2_000_000,
            Currency::parse("EUR").unwrap(),
            1,
            customer_hash("b"),
        );
        assert_eq!(a.revenue_by_currency.len(), 2);
    }

    #[test]
    fn a_cloned_large_set_is_a_snapshot() {
        let mut s = CustomerSet::default();
        for i in 0..100u64 {
            s.insert(i);
        }
        let snapshot = s.clone();
        s.insert(1_000);
        s.insert(5);
        assert_eq!((snapshot.len(), s.len()), (100, 101));
        assert!(!snapshot.contains(1_000) && s.contains(1_000));
    }

    #[test]
    fn empty_aggregate_has_no_derived_figures() {
        let a = Aggregate::default();
        assert_eq!(
            (a.avg_usd_micros(), a.min_usd(), a.p95_usd()),
            (None, None, None)
        );
    }
}
