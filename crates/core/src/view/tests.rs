use super::*;

fn partial(usd: i128, is_final: bool, epoch: u64) -> ViewUpdate {
    let agg = PartialAgg {
        count: 1,
        revenue_usd_micros: usd * MICROS as i128,
        ..PartialAgg::default()
    };
    ViewUpdate::Window(
        0,
        Box::new(WindowPartial {
            spec: "t".into(),
            kind: "tumbling".into(),
            by: "currency".into(),
            key: "USD".into(),
            start: 0,
            end: 60_000,
            is_final,
            epoch,
            agg,
        }),
    )
}

fn revenue(v: &View) -> Vec<i128> {
    v.windows(&WindowQuery {
        kind: "tumbling".into(),
        by: "currency".into(),
        ..WindowQuery::default()
    })
    .iter()
    .map(|w| w.revenue_usd_micros / MICROS as i128)
    .collect()
}

/// Law: a row of an older writer epoch, arriving after one of a newer
/// epoch for the same key, is a stale writer's and changes nothing;
/// a newer epoch replaces an older one. Checked to fail by dropping
/// the epoch comparison in `Entry::set` (the stale 5 replaced the 7).
#[test]
fn a_stale_writers_partial_is_ignored() {
    let mut v = View::new(0);
    v.apply(partial(3, false, 1));
    v.apply(partial(7, false, 2));
    v.apply(partial(5, false, 1));
    assert_eq!(revenue(&v), vec![7]);
    assert_eq!(v.stale_ignored(), 1);
    v.apply(partial(9, false, 3));
    assert_eq!(revenue(&v), vec![9]);
}

/// Progress from an older epoch cannot move a partition's `as_of`
/// back (a zombie's watermark would un-finalise windows).
#[test]
fn a_stale_writers_progress_is_ignored() {
    let mut v = View::new(0);
    v.set_input_partitions(1);
    let progress = |wm: i64, epoch: u64| {
        ViewUpdate::Progress(ProgressRecord {
            partition: 0,
            next_offset: wm,
            watermark: Some(wm),
            idle: false,
            epoch,
        })
    };
    v.apply(progress(100, 2));
    v.apply(progress(50, 1));
    assert_eq!(v.global_watermark(), Some(100));
    v.apply(progress(70, 2));
    assert_eq!(v.global_watermark(), Some(70));
}
