//! Helpers shared by the core's test files.
#![allow(dead_code)]

use tally_core::{Effect, WindowUpdate};

/// 2023-11-14T21:53:00Z: a minute boundary inside the default event-time range.
pub const T0: i64 = 1_699_999_980_000;

/// The JSON of one order; `amount` in cents of `currency`.
pub fn order_json(
    id: &str,
    customer: &str,
    cents: i64,
    currency: &str,
    t_ms: i64,
    region: &str,
) -> Vec<u8> {
    format!(
        r#"{{"order_id":"{id}","customer_id":"{customer}","amount":"{}.{:02}","currency":"{currency}","created_at":{t_ms},"region":"{region}"}}"#,
        cents / 100,
        cents % 100
    )
    .into_bytes()
}

/// Final window results among `effects`.
pub fn finals(effects: &[Effect]) -> Vec<&WindowUpdate> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Window(w) if w.is_final() => Some(w),
            _ => None,
        })
        .collect()
}

/// One line per effect, stable and readable: the golden tests' format.
pub fn render(e: &Effect) -> String {
    match e {
        Effect::Accepted {
            partition,
            offset,
            order,
            alert,
            late_windows,
        } => format!(
            "accepted p{partition}@{offset} {} usd={} alert={alert} late_windows={late_windows}",
            order.order.order_id,
            micros(order.amount_usd_micros as i128)
        ),
        Effect::Late {
            partition,
            offset,
            order,
            alert,
        } => {
            format!(
                "late p{partition}@{offset} {} alert={alert}",
                order.order.order_id
            )
        }
        Effect::Rejected {
            partition,
            offset,
            rejection,
        } => {
            format!(
                "rejected p{partition}@{offset} {} field={:?}",
                rejection.reason, rejection.field
            )
        }
        Effect::Duplicate {
            partition,
            offset,
            order_id,
        } => {
            format!("duplicate p{partition}@{offset} {order_id}")
        }
        Effect::Retracted {
            partition,
            spec_name,
            key,
        } => {
            format!(
                "retract p{partition} {spec_name}|{}|{}",
                key.group,
                rel(key.start)
            )
        }
        Effect::Expired {
            partition,
            spec_name,
            key,
        } => {
            format!(
                "expire p{partition} {spec_name}|{}|{}",
                key.group,
                rel(key.start)
            )
        }
        Effect::Window(w) => {
            let a = &w.row.agg;
            format!(
                "window p{} {}|{}|{} end={} final={} count={} usd={} customers={} min={} max={} off={}",
                w.partition,
                w.spec_name,
                w.key.group,
                rel(w.key.start),
                rel(w.row.end),
                w.row.closed,
                a.count,
                micros(a.revenue_usd_micros),
                a.unique_customers(),
                micros(a.min_usd_micros as i128),
                micros(a.max_usd_micros as i128),
                w.row.offset
            )
        }
    }
}

/// Times in golden files are relative to T0, so they stay readable.
pub fn rel(t: i64) -> String {
    if t == i64::MAX {
        return "+inf".into();
    }
    format!("T{:+}", t - T0)
}

pub fn micros(m: i128) -> String {
    format!("{}.{:06}", m / 1_000_000, (m % 1_000_000).abs())
}
