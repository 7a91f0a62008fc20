//! Law: a total the view serves as final never changes, across any
//! interleaving of the partitions' partials and progress rows, as long as
//! each input partition's rows arrive in the order its pod wrote them
//! (the pod writes all of a partition's rows to one `revenue-windows`
//! partition, so they do).
//!
//! Each partition is modelled as its pod behaves: events in event-time
//! order; when its watermark passes a window's close it publishes that
//! window's final partial, then a progress row; every event publishes the
//! window's running (non-final) partial. Some partitions have no events
//! and publish only progress.
//!
//! Checked to fail on the view before it knew the input's partition count
//! (the global watermark was the minimum over partitions that had
//! published): a window partition 0 had closed was served final with
//! partition 0's total, and grew when partition 1's partial arrived.

use proptest::prelude::*;
use tally_core::aggregate::PartialAgg;
use tally_core::order::MICROS;
use tally_core::view::{ProgressRecord, View, ViewUpdate, WindowPartial, WindowQuery};

const SIZE: i64 = 10;

fn partial(p: i32, start: i64, usd: i128, count: u64, is_final: bool) -> ViewUpdate {
    ViewUpdate::Window(
        p,
        Box::new(WindowPartial {
            spec: "t".into(),
            kind: "tumbling".into(),
            by: "currency".into(),
            key: "USD".into(),
            start,
            end: start + SIZE,
            is_final,
            epoch: 1,
            agg: PartialAgg {
                count,
                revenue_usd_micros: usd * MICROS as i128,
                ..PartialAgg::default()
            },
        }),
    )
}

fn progress(p: i32, wm: i64) -> ViewUpdate {
    ViewUpdate::Progress(ProgressRecord {
        partition: p,
        next_offset: 0,
        watermark: Some(wm),
        idle: false,
        epoch: 1,
    })
}

/// What partition `p`'s pod publishes for `events` (time, USD).
fn publish(p: i32, mut events: Vec<(i64, i128)>) -> Vec<ViewUpdate> {
    events.sort();
    let mut out = Vec::new();
    // Open windows: start → (usd, count).
    let mut open: std::collections::BTreeMap<i64, (i128, u64)> = Default::default();
    let close_until = |out: &mut Vec<ViewUpdate>,
                       open: &mut std::collections::BTreeMap<i64, (i128, u64)>,
                       wm: i64| {
        let closed: Vec<i64> = open.keys().copied().filter(|s| s + SIZE <= wm).collect();
        for s in closed {
            let (usd, n) = open.remove(&s).unwrap();
            out.push(partial(p, s, usd, n, true));
        }
        out.push(progress(p, wm));
    };
    for (t, usd) in events {
        close_until(&mut out, &mut open, t);
        let start = t - t.rem_euclid(SIZE);
        let e = open.entry(start).or_default();
        e.0 += usd;
        e.1 += 1;
        out.push(partial(p, start, e.0, e.1, false));
    }
    close_until(&mut out, &mut open, 1_000);
    out
}

fn finals(v: &View) -> std::collections::BTreeMap<i64, (u64, i128)> {
    v.windows(&WindowQuery {
        kind: "tumbling".into(),
        by: "currency".into(),
        is_final: Some(true),
        ..WindowQuery::default()
    })
    .into_iter()
    .map(|w| (w.start, (w.count, w.revenue_usd_micros)))
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn a_total_served_as_final_never_changes(
        per_partition in prop::collection::vec(
            prop::collection::vec((0i64..60, 1i128..100), 0..12),
            1..4,
        ),
        picks in prop::collection::vec(0usize..16, 0..200),
    ) {
        let n = per_partition.len();
        let mut queues: Vec<std::collections::VecDeque<ViewUpdate>> = per_partition
            .iter()
            .enumerate()
            .map(|(p, evs)| publish(p as i32, evs.clone()).into())
            .collect();
        let mut v = View::new(0);
        v.set_input_partitions(n);
        let mut served: std::collections::BTreeMap<i64, (u64, i128)> = Default::default();
        let mut picks = picks.into_iter();
        loop {
            let live: Vec<usize> = (0..n).filter(|p| !queues[*p].is_empty()).collect();
            if live.is_empty() {
                break;
            }
            let p = live[picks.next().unwrap_or(0) % live.len()];
            v.apply(queues[p].pop_front().unwrap());
            let now = finals(&v);
            for (start, total) in &served {
                prop_assert_eq!(
                    now.get(start),
                    Some(total),
                    "window {} was served final with {:?}", start, total
                );
            }
            served = now;
        }
        // In the end every window is final with the sum of its events.
        let mut truth: std::collections::BTreeMap<i64, (u64, i128)> = Default::default();
        for evs in &per_partition {
            for (t, usd) in evs {
                let e = truth.entry(t - t.rem_euclid(SIZE)).or_default();
                e.0 += 1;
                e.1 += usd * MICROS as i128;
            }
        }
        prop_assert_eq!(served, truth);
    }
}
