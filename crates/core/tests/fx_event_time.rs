//! FX by event time : an order's USD value is a
//! function of the input alone. It converts at the rate in force at its
//! `created_at`, so processing it again after a crash gives the same cent
//! whatever rates arrived in between; a rate that arrives after orders it
//! would have applied to is flagged, and never changes a closed window.
//!
//! How the scenario test was checked to fail before: on the commit before,
//! the table held one rate per currency and an update replaced it. Its
//! steps written against that API (`fx_mut().set(EUR, 1.10)` where this
//! test adds the version of 12:01) gave a reprocessed final of 110 USD,
//! not the 108 the first run had published.

use tally_core::order::MICROS;
use tally_core::{
    CoreConfig, Currency, Effect, Engine, FxTable, FxUpdate, GroupBy, Rate, WindowSpec, FROM_START,
};

/// 2023-11-14T22:13:00Z, the start of a one-minute window.
const T0: i64 = 1_699_999_980_000;
const MIN: i64 = 60_000;

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn rate(x: f64) -> Rate {
    Rate::from_f64(x).unwrap()
}

fn order(id: &str, euros: i64, t_ms: i64) -> Vec<u8> {
    format!(
        r#"{{"order_id":"{id}","customer_id":"c","amount":{euros},"currency":"EUR","created_at":{t_ms}}}"#
    )
    .into_bytes()
}

fn engine(fx: FxTable) -> Engine {
    let cfg = CoreConfig {
        windows: vec![WindowSpec::tumbling("t", MIN, GroupBy::Currency)],
        out_of_orderness_ms: 0,
        grace_ms: 0,
        ..CoreConfig::default()
    };
    let mut e = Engine::new(cfg, fx).unwrap();
    e.assign(0, 0);
    e
}

/// The USD total (whole dollars) of every final the effects hold, by window start.
fn finals(out: &[Effect]) -> Vec<(i64, i128)> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Window(w) if w.is_final() => {
                Some((w.key.start, w.row.agg.revenue_usd_micros / MICROS as i128))
            }
            _ => None,
        })
        .collect()
}

fn table(versions: &[(i64, f64)]) -> FxTable {
    let mut fx = FxTable::empty();
    for (from, x) in versions {
        fx.set_from(eur(), *from, rate(*x));
    }
    fx
}

#[test]
fn an_order_converts_at_the_rate_in_force_at_its_created_at() {
    let fx = table(&[(FROM_START, 1.08), (T0 + 30_000, 1.10)]);
    assert_eq!(fx.rate_at(eur(), T0 + 29_999), Some(rate(1.08)));
    assert_eq!(fx.rate_at(eur(), T0 + 30_000), Some(rate(1.10)));
    assert_eq!(fx.get(eur()), Some(rate(1.10)));
    let mut e = engine(fx);
    let mut out = Vec::new();
    e.on_record(0, 0, &order("a", 100, T0 + 1_000), 0, &mut out);
    e.on_record(0, 1, &order("b", 100, T0 + 40_000), 0, &mut out);
    e.finish(0, &mut out);
    assert_eq!(finals(&out), vec![(T0, 218)]);
}

#[test]
fn before_its_first_version_a_currency_has_no_rate() {
    let fx = table(&[(T0, 1.10)]);
    let mut e = engine(fx);
    let mut out = Vec::new();
    e.on_record(0, 0, &order("a", 100, T0 - 1), 0, &mut out);
    assert!(
        out.iter().any(|e| matches!(e, Effect::Rejected { .. })),
        "{out:?}"
    );
}

/// Scenario 1: EUR 100 is processed at 1.08 and its partial (108 USD)
/// published; the pod crashes before the flush is durable; a new rate
/// (1.10 from 12:01) arrives; the next pod processes the order again from
/// nothing durable. The window's final is still 108.
#[test]
fn a_crash_and_a_new_rate_do_not_change_a_reprocessed_order() {
    let first_table = table(&[(FROM_START, 1.08)]);
    let mut first = engine(first_table.clone());
    let mut out = Vec::new();
    first.on_record(0, 0, &order("a", 100, T0 + 1_000), 0, &mut out);
    let mut changes = Vec::new();
    first.flush(&mut out, &mut changes);
    let published: Vec<i128> = out
        .iter()
        .filter_map(|e| match e {
            Effect::Window(w) => Some(w.row.agg.revenue_usd_micros / MICROS as i128),
            _ => None,
        })
        .collect();
    assert_eq!(published, vec![108]);
    // Crash: nothing of `first` was durable. The rate moves on.
    let mut later_table = first_table;
    later_table.apply(FxUpdate::Set {
        currency: eur(),
        from_ms: T0 + 61_000,
        rate: rate(1.10),
    });
    let mut second = engine(later_table);
    let mut out = Vec::new();
    second.on_record(0, 0, &order("a", 100, T0 + 1_000), 10, &mut out);
    second.finish(0, &mut out);
    assert_eq!(finals(&out), vec![(T0, 108)]);
}

/// A version in force from a time the engine has already processed
/// orders of is late: flagged, applied to later orders only, and a closed
/// window keeps its final. A version ahead of the stream is not late.
#[test]
fn a_late_rate_is_flagged_and_never_changes_a_closed_window() {
    let mut e = engine(table(&[(FROM_START, 1.08)]));
    let mut out = Vec::new();
    e.on_record(0, 0, &order("a", 100, T0 + 1_000), 0, &mut out);
    // The next order closes the first window (no grace, no disorder).
    e.on_record(0, 1, &order("b", 100, T0 + MIN + 1_000), 0, &mut out);
    assert_eq!(finals(&out), vec![(T0, 108)]);
    let ahead = FxUpdate::Set {
        currency: eur(),
        from_ms: T0 + 2 * MIN,
        rate: rate(1.20),
    };
    assert!(
        !e.apply_fx(ahead),
        "a version ahead of the stream is not late"
    );
    let late = FxUpdate::Set {
        currency: eur(),
        from_ms: T0,
        rate: rate(1.10),
    };
    assert!(e.apply_fx(late), "a version behind the stream is late");
    assert!(!e.apply_fx(late), "the same version again changes nothing");
    let mut out = Vec::new();
    e.on_record(0, 2, &order("c", 100, T0 + MIN + 2_000), 0, &mut out);
    e.on_record(0, 3, &order("d", 100, T0 + 2 * MIN + 1_000), 0, &mut out);
    e.finish(0, &mut out);
    // The first window's final is not emitted again; the second converts
    // b at 1.08 (already folded) and c at the late 1.10; the third d at
    // the version ahead.
    assert_eq!(finals(&out), vec![(T0 + MIN, 218), (T0 + 2 * MIN, 120)]);
}

#[test]
fn removing_a_version_brings_the_one_before_it_back() {
    let mut fx = table(&[(FROM_START, 1.08), (T0, 1.10)]);
    fx.apply(FxUpdate::Remove {
        currency: eur(),
        from_ms: T0,
    });
    assert_eq!(fx.rate_at(eur(), T0 + 1), Some(rate(1.08)));
    fx.remove(eur());
    assert_eq!(fx.rate_at(eur(), T0 + 1), None);
    assert!(fx.is_empty());
}
