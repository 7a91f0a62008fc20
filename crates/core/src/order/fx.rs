//! FX rates: fixed-point rates, the versioned table of them by event
//! time, and the conversion to USD micro-dollars.

use super::*;

/// An FX rate to USD, fixed-point with [`RATE_SCALE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate(pub i64);

impl Rate {
    /// A positive, finite rate. Rates below 10^-9 are not representable.
    pub fn from_f64(x: f64) -> Option<Rate> {
        if !x.is_finite() || x <= 0.0 {
            return None;
        }
        let scaled = (x * RATE_SCALE as f64).round();
        if !(1.0..=1e15).contains(&scaled) {
            return None;
        }
        Some(Rate(scaled as i64))
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / RATE_SCALE as f64
    }
}

/// The largest USD value one order may have: a trillion dollars, in
/// micro-dollars. Amounts (≤ 10¹² units) and rates (≤ 10⁶) are each
/// bounded, but their product is not within `i64`; an order worth more
/// is rejected (`amount_out_of_range`) rather than wrapped.
pub const MAX_ORDER_USD_MICROS: i64 = 1_000_000_000_000 * MICROS;

/// `amount × rate`, rounded half up to the micro. Integer arithmetic, so the
/// generator's ground truth and the pod compute the same cent. `None`
/// above [`MAX_ORDER_USD_MICROS`].
pub fn usd_micros(amount_micros: i64, rate: Rate) -> Option<i64> {
    let scale = RATE_SCALE as i128;
    let p = amount_micros as i128 * rate.0 as i128;
    let usd = (p + scale / 2) / scale;
    (usd <= MAX_ORDER_USD_MICROS as i128).then_some(usd as i64)
}

/// The currency → USD table used for enrichment, versioned by event time:
/// each currency has rates, each in force from a time on (ms since the
/// epoch; [`FROM_START`] for a rate with no time). An order converts at the
/// rate in force at its `created_at`, as in Flink's event-time temporal
/// join, so its USD value is a function of the input alone (orders and
/// `fx-rates`): processing it again after a crash, or in `tally replay`,
/// gives the same cent whatever rates arrived in between, as long as no
/// rate arrived *late* (in force from a time the pod had already processed
/// orders of; [`FxTable::is_late`]). The pod keeps it current from the
/// compacted `fx-rates` topic; the core only reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FxTable {
    /// Per currency, its versions sorted by the time they are in force from.
    rates: HashMap<Currency, Vec<(i64, Rate)>>,
}

/// One `fx-rates` record, parsed: a version of a currency's rate set, or
/// removed (a tombstone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FxUpdate {
    Set {
        currency: Currency,
        from_ms: i64,
        rate: Rate,
    },
    Remove {
        currency: Currency,
        from_ms: i64,
    },
}

/// The time a rate with no time of its own is in force from: the start.
pub const FROM_START: i64 = i64::MIN;

/// Rates used when `fx-rates` is empty.
pub const DEFAULT_RATES: [(&str, f64); 10] = [
    ("USD", 1.0),
    ("EUR", 1.08),
    ("GBP", 1.27),
    ("JPY", 0.0067),
    ("CAD", 0.73),
    ("AUD", 0.66),
    ("CHF", 1.13),
    ("SEK", 0.095),
    ("INR", 0.012),
    ("BRL", 0.18),
];

impl FxTable {
    pub fn empty() -> Self {
        FxTable::default()
    }

    pub fn with_defaults() -> Self {
        let mut t = FxTable::empty();
        for (c, r) in DEFAULT_RATES {
            if let (Some(c), Some(r)) = (Currency::parse(c), Rate::from_f64(r)) {
                t.set(c, r);
            }
        }
        t
    }

    /// Sets the rate in force from the start (a rate with no time).
    pub fn set(&mut self, currency: Currency, rate: Rate) {
        self.set_from(currency, FROM_START, rate);
    }

    /// Sets the rate in force from `from_ms` on (until the next version's
    /// time), replacing a version of the same time.
    pub fn set_from(&mut self, currency: Currency, from_ms: i64, rate: Rate) {
        let v = self.rates.entry(currency).or_default();
        match v.binary_search_by_key(&from_ms, |(t, _)| *t) {
            Ok(i) => v[i].1 = rate,
            Err(i) => v.insert(i, (from_ms, rate)),
        }
    }

    /// Removes the version in force from `from_ms` (a tombstone of it);
    /// the version before it, if any, stays in force after that time.
    pub fn remove_from(&mut self, currency: Currency, from_ms: i64) {
        if let Some(v) = self.rates.get_mut(&currency) {
            v.retain(|(t, _)| *t != from_ms);
            if v.is_empty() {
                self.rates.remove(&currency);
            }
        }
    }

    /// Applies one `fx-rates` record.
    pub fn apply(&mut self, update: FxUpdate) {
        match update {
            FxUpdate::Set {
                currency,
                from_ms,
                rate,
            } => self.set_from(currency, from_ms, rate),
            FxUpdate::Remove { currency, from_ms } => self.remove_from(currency, from_ms),
        }
    }

    /// Removes the rate with no time (a tombstone of the old format).
    pub fn remove(&mut self, currency: Currency) {
        self.remove_from(currency, FROM_START);
    }

    /// The rate in force at event time `at_ms`: the version with the
    /// latest time at or before it. None before the first version.
    pub fn rate_at(&self, currency: Currency, at_ms: i64) -> Option<Rate> {
        let v = self.rates.get(&currency)?;
        let i = v.partition_point(|(t, _)| *t <= at_ms);
        i.checked_sub(1).map(|i| v[i].1)
    }

    /// The version in force from exactly `from_ms`, if there is one.
    pub fn version(&self, currency: Currency, from_ms: i64) -> Option<Rate> {
        let v = self.rates.get(&currency)?;
        let i = v.binary_search_by_key(&from_ms, |(t, _)| *t).ok()?;
        Some(v[i].1)
    }

    /// The rate in force now and from then on: the latest version.
    pub fn get(&self, currency: Currency) -> Option<Rate> {
        self.rate_at(currency, i64::MAX)
    }

    /// Whether a version in force from `from_ms` arrives late for a
    /// stream whose largest event time processed so far is
    /// `max_event_ms`: orders it would have applied to may already have
    /// been converted at the version before it. It applies to the orders
    /// processed from now on; what was converted (and windows closed)
    /// stays as it is, and `tally replay`, which knows every version from
    /// the start, may differ on those orders.
    pub fn is_late(from_ms: i64, max_event_ms: Option<i64>) -> bool {
        max_event_ms.is_some_and(|m| from_ms <= m)
    }

    /// Number of versions, over every currency.
    pub fn version_count(&self) -> usize {
        self.rates.values().map(Vec::len).sum()
    }

    /// Number of currencies.
    pub fn len(&self) -> usize {
        self.rates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rates.is_empty()
    }

    /// Every version, sorted by currency then time.
    pub fn versions(&self) -> Vec<(Currency, i64, Rate)> {
        let mut v: Vec<_> = self
            .rates
            .iter()
            .flat_map(|(c, vs)| vs.iter().map(|(t, r)| (*c, *t, *r)))
            .collect();
        v.sort();
        v
    }

    /// The latest rate of each currency, sorted by currency.
    pub fn entries(&self) -> Vec<(Currency, Rate)> {
        let mut v: Vec<_> = self
            .rates
            .keys()
            .filter_map(|c| Some((*c, self.get(*c)?)))
            .collect();
        v.sort();
        v
    }
}

impl PartialOrd for Rate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}
