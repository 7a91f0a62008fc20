//! Hostile input and settings, in the core: one bad record or setting
//! never moves a partition's time for good, wraps money, or wraps event
//! time. The end-to-end forms of these cases are in the shell's
//! `tests/hostile_input.rs`.

mod support;

use support::{order_json, T0};
use tally_core::order::{usd_micros, MAX_ORDER_USD_MICROS, MICROS};
use tally_core::window::parse_window_list;
use tally_core::{
    CoreConfig, Currency, Effect, Engine, FxTable, InMemory, Limits, Rate, Reason, StateReader,
    WindowSpec,
};

fn outcome(e: &[Effect]) -> Vec<String> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Accepted { order, .. } => Some(format!("accepted {}", order.order.order_id)),
            Effect::Late { order, .. } => Some(format!("late {}", order.order.order_id)),
            Effect::Rejected { rejection, .. } => Some(format!("rejected {}", rejection.reason)),
            _ => None,
        })
        .collect()
}

fn feed(
    engine: &mut Engine,
    p: i32,
    offset: i64,
    id: &str,
    t_ms: i64,
    record_ms: Option<i64>,
) -> Vec<String> {
    feed_at(engine, p, offset, id, t_ms, record_ms, 0)
}

fn feed_at(
    engine: &mut Engine,
    p: i32,
    offset: i64,
    id: &str,
    t_ms: i64,
    record_ms: Option<i64>,
    wall_ms: i64,
) -> Vec<String> {
    let mut out = Vec::new();
    let json = order_json(id, "c1", 1_000, "USD", t_ms, "eu");
    let reader: &mut dyn StateReader = &mut InMemory;
    engine.on_record_at(p, offset, &json, record_ms, wall_ms, &mut out, reader);
    outcome(&out)
}

/// 2099-01-01T00:00:00Z: inside the default accepted range.
const Y2099: i64 = 4_070_908_800_000;

/// A future-dated order (its `created_at` in 2099, inside the accepted
/// range) is rejected as `timestamp_in_future` against its record's Kafka
/// timestamp, and the partition's next orders are counted as usual.
///
/// Reproduced first, on the code before the check: the same records
/// through `on_record` (no record timestamp to compare with, as every
/// record was fed then) moved the watermark to 2099, and the next order
/// was late. The second half of this test keeps that control: without a
/// timestamp the order is accepted and poisons the partition, which is
/// why the shell always passes the record's timestamp.
#[test]
fn a_future_dated_order_does_not_move_its_partitions_time() {
    let mut e = Engine::new(CoreConfig::default(), FxTable::with_defaults()).unwrap();
    assert_eq!(feed(&mut e, 0, 0, "a", T0, Some(T0)), ["accepted a"]);
    assert_eq!(
        feed(&mut e, 0, 1, "future", Y2099, Some(T0 + 1_000)),
        ["rejected timestamp_in_future"]
    );
    assert_eq!(
        feed(&mut e, 0, 2, "b", T0 + 2_000, Some(T0 + 2_000)),
        ["accepted b"]
    );
    let wm = e.status(0).unwrap().watermark.unwrap();
    assert_eq!(
        wm,
        T0 + 2_000 - 5_000,
        "the watermark follows the valid orders"
    );
    // Within the allowed skew (a minute by default) an order is accepted.
    assert_eq!(
        feed(&mut e, 0, 3, "skewed", T0 + 62_000, Some(T0 + 3_000)),
        ["accepted skewed"]
    );

    // The hazard the check closes: with no timestamp to compare with, the
    // 2099 order moves the watermark, and the next order is late.
    let mut e = Engine::new(CoreConfig::default(), FxTable::with_defaults()).unwrap();
    assert_eq!(
        feed(&mut e, 0, 0, "future", Y2099, None),
        ["accepted future"]
    );
    assert_eq!(feed(&mut e, 0, 1, "b", T0, None), ["late b"]);
}

/// An idle partition follows the watermark of the active ones, so a
/// poisoned partition would take every idle one with it. With the check,
/// an idle partition follows the valid orders' time, not 2099.
///
/// Reproduced first without a record timestamp (as above): p1, idle,
/// jumped to 2099 − 5 s.
#[test]
fn an_idle_partition_does_not_follow_a_future_dated_order() {
    let mut e = Engine::new(CoreConfig::default(), FxTable::with_defaults()).unwrap();
    let mut out = Vec::new();
    e.assign(0, 0);
    e.assign(1, 0);
    feed(&mut e, 0, 0, "a", T0, Some(T0));
    feed(&mut e, 0, 1, "future", Y2099, Some(T0));
    feed_at(&mut e, 0, 2, "b", T0 + 1_000, Some(T0 + 1_000), 31_000);
    e.tick(31_000, &mut out);
    assert!(!e.status(0).unwrap().idle);
    let p1 = e.status(1).unwrap();
    assert!(p1.idle, "p1 had nothing for longer than the idle timeout");
    assert!(
        p1.watermark.unwrap() <= T0,
        "p1 follows the valid orders, got {:?}",
        p1.watermark
    );
}

/// `amount × rate` is bounded: an order worth more than a trillion USD is
/// rejected as `amount_out_of_range`, never wrapped. Inside every
/// validated bound (`--max-amount 1e12`, XAU at 2,650 USD), 5·10⁹ XAU
/// overflowed `i64` micro-dollars on the code before: checked, its
/// `amount_usd_micros` came out as −5,196,744,073,709,551,616.
#[test]
fn money_never_wraps() {
    let xau = Currency::parse("XAU").unwrap();
    let mut fx = FxTable::with_defaults();
    fx.set(xau, Rate::from_f64(2_650.0).unwrap());
    let limits = Limits {
        max_amount_micros: 1_000_000_000_000 * MICROS,
        ..Limits::default()
    };
    let order = |amount: &str| {
        format!(
            r#"{{"order_id":"o","customer_id":"c","amount":"{amount}","currency":"XAU","created_at":{T0}}}"#
        )
    };
    let r = tally_core::validate(order("5000000000").as_bytes(), &limits, &fx, 0).unwrap_err();
    assert_eq!(r.reason, Reason::AmountOutOfRange);
    assert_eq!(r.field, Some("amount"));
    let ok = tally_core::validate(order("1000").as_bytes(), &limits, &fx, 0).unwrap();
    assert_eq!(ok.amount_usd_micros, 2_650_000 * MICROS);

    // The edge, at a rate of 2: 5·10¹¹ units is exactly the bound.
    let two = Rate::from_f64(2.0).unwrap();
    assert_eq!(
        usd_micros(500_000_000_000 * MICROS, two),
        Some(MAX_ORDER_USD_MICROS)
    );
    assert_eq!(usd_micros(500_000_000_000 * MICROS + 1, two), None);
    assert_eq!(usd_micros(i64::MAX, Rate::from_f64(1e6).unwrap()), None);
}

/// Every duration is bounded (ten years) and refused with its field's
/// name; so is an event-time range outside 1970–9999. Settings near
/// `i64::MAX` were accepted on the code before. Checked there: a dedup
/// horizon or idle timeout of `i64::MAX − 1` passed `validate`, and the
/// first order then panicked on an overflow in the engine (a debug build;
/// a release build wraps); a grace of `i64::MAX − 1` panicked inside
/// `validate` itself; a session gap of `i64::MAX` parsed.
#[test]
fn durations_near_the_integer_limit_are_refused_by_name() {
    let huge = i64::MAX - 1;
    let cases: Vec<(&str, CoreConfig)> = vec![
        (
            "grace_ms",
            CoreConfig {
                grace_ms: huge,
                ..CoreConfig::default()
            },
        ),
        (
            "out_of_orderness_ms",
            CoreConfig {
                out_of_orderness_ms: huge,
                ..CoreConfig::default()
            },
        ),
        (
            "idle_timeout_ms",
            CoreConfig {
                idle_timeout_ms: huge,
                ..CoreConfig::default()
            },
        ),
        (
            "dedup_horizon_ms",
            CoreConfig {
                dedup_horizon_ms: huge,
                ..CoreConfig::default()
            },
        ),
        (
            "window_retention_ms",
            CoreConfig {
                window_retention_ms: huge,
                ..CoreConfig::default()
            },
        ),
        (
            "max_future_skew_ms",
            CoreConfig {
                max_future_skew_ms: huge,
                ..CoreConfig::default()
            },
        ),
        (
            "min_event_time",
            CoreConfig {
                limits: Limits {
                    min_event_ms: -1,
                    ..Limits::default()
                },
                ..CoreConfig::default()
            },
        ),
        (
            "max_event_time",
            CoreConfig {
                limits: Limits {
                    max_event_ms: i64::MAX,
                    ..Limits::default()
                },
                ..CoreConfig::default()
            },
        ),
        (
            "max_amount",
            CoreConfig {
                limits: Limits {
                    max_amount_micros: i64::MAX,
                    ..Limits::default()
                },
                ..CoreConfig::default()
            },
        ),
    ];
    for (field, cfg) in cases {
        let err = cfg.validate().expect_err(field);
        assert_eq!(err.field, field, "{err}");
    }
    for list in [
        "tumbling:t:9223372036854775807:currency",
        "sliding:s:9223372036854775806:1:region",
        "session:g:9223372036854775807",
    ] {
        let err = parse_window_list(list).expect_err(list);
        assert!(err.contains("ten years"), "{err}");
    }
    let windows = vec![WindowSpec::session("g", i64::MAX)];
    let err = CoreConfig {
        windows,
        ..CoreConfig::default()
    }
    .validate()
    .unwrap_err();
    assert_eq!(err.field, "windows", "{err}");
    // Ten years is allowed.
    let ten_years = tally_core::engine::MAX_DURATION_MS;
    let cfg = CoreConfig {
        dedup_horizon_ms: ten_years,
        window_retention_ms: ten_years,
        ..CoreConfig::default()
    };
    cfg.validate().unwrap();
}
