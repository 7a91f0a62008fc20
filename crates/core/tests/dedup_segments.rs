//! Dedup entries reach the changelog as segments (to cut
//! write amplification): one [`StateRow::DedupSegment`] a partition a flush,
//! tombstoned whole once every entry in it has expired under a durable
//! watermark; per-id deletes stay local. A pod restored from the
//! changelog's segments alone still recognises every live duplicate.
//!
//! How these were checked to fail: with the engine's flush patched back
//! to per-id `Dedup` puts (as before segments), the first test found
//! 1,500 of them in the changelog's share of one flush, and the chunking
//! and tombstone tests found no segment; with `restore_dedup` taking the
//! row that comes last instead of the one with the higher offset, the
//! last test counted the re-seen order again (no `Duplicate` effect).
//! The restore test passes either way: it guards the segments' content.

use std::collections::BTreeMap;

use tally_core::{
    CoreConfig, DedupRow, DedupSegment, Effect, Engine, FxTable, GroupBy, RowKey, StateChange,
    StateRow, WindowSpec,
};

const T0: i64 = 1_699_999_980_000;
const MIN: i64 = 60_000;
const HORIZON: i64 = 10 * MIN;

fn config() -> CoreConfig {
    CoreConfig {
        windows: vec![WindowSpec::tumbling("t", MIN, GroupBy::Currency)],
        out_of_orderness_ms: 0,
        grace_ms: 0,
        dedup_horizon_ms: HORIZON,
        window_retention_ms: MIN,
        ..CoreConfig::default()
    }
}

fn order(id: &str, t_ms: i64) -> Vec<u8> {
    format!(
        r#"{{"order_id":"{id}","customer_id":"c","amount":10,"currency":"USD","created_at":{t_ms}}}"#
    )
    .into_bytes()
}

fn engine() -> Engine {
    Engine::new(config(), FxTable::with_defaults()).unwrap()
}

/// One flush, made durable at once; returns the changelog's share.
fn flush(e: &mut Engine) -> Vec<StateChange> {
    let (mut out, mut changes) = (Vec::new(), Vec::new());
    let id = e.flush(&mut out, &mut changes);
    e.on_durable(id);
    changes.into_iter().filter(|c| c.in_changelog()).collect()
}

/// The segments a flush put: partition, key, segment.
fn segments(changes: &[StateChange]) -> Vec<(i32, RowKey, &DedupSegment)> {
    changes
        .iter()
        .filter_map(|c| match c {
            StateChange::Put(p, r @ StateRow::DedupSegment(_, _, s)) => Some((*p, r.key(), s)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_flush_writes_its_dedup_entries_as_one_segment_a_partition() {
    let mut e = engine();
    let mut out = Vec::new();
    for i in 0..1_500i64 {
        let p = if i < 1_000 { 0 } else { 1 };
        e.on_record(p, i, &order(&format!("o{i}"), T0 + i), 0, &mut out);
    }
    let changes = flush(&mut e);
    let per_id = changes
        .iter()
        .filter(|c| {
            matches!(
                c,
                StateChange::Put(_, StateRow::Dedup(..)) | StateChange::Delete(_, RowKey::Dedup(_))
            )
        })
        .count();
    assert_eq!(per_id, 0, "per-id dedup records in the changelog");
    let segs = segments(&changes);
    let sizes: Vec<(i32, usize)> = segs.iter().map(|(p, _, s)| (*p, s.entries.len())).collect();
    assert_eq!(sizes, vec![(0, 1_000), (1, 500)]);
    // Expiry: the latest entry's event time plus the horizon.
    assert_eq!(segs[0].2.expire_ms, T0 + 999 + HORIZON);
}

#[test]
fn a_large_flush_is_cut_into_segments_under_a_quarter_megabyte() {
    let mut e = engine();
    let mut out = Vec::new();
    let long = "x".repeat(2_000);
    for i in 0..300i64 {
        e.on_record(0, i, &order(&format!("{long}{i}"), T0), 0, &mut out);
    }
    let changes = flush(&mut e);
    let segs = segments(&changes);
    assert_eq!(segs.len(), 3, "600 kB of ids in 256 kB segments");
    assert_eq!(
        segs.iter().map(|(_, _, s)| s.entries.len()).sum::<usize>(),
        300
    );
    let keys: Vec<RowKey> = segs.into_iter().map(|(_, k, _)| k).collect();
    assert_eq!(
        keys,
        vec![
            RowKey::DedupSegment(300, 0),
            RowKey::DedupSegment(300, 1),
            RowKey::DedupSegment(300, 2)
        ]
    );
}

#[test]
fn a_segment_is_tombstoned_once_every_entry_has_expired() {
    let mut e = engine();
    let mut out = Vec::new();
    e.on_record(0, 0, &order("a", T0), 0, &mut out);
    e.on_record(0, 1, &order("b", T0 + 5 * MIN), 0, &mut out);
    let first = flush(&mut e);
    let segs = segments(&first);
    assert_eq!(segs.len(), 1, "one segment expected: {first:?}");
    let key = segs[0].1.clone();
    let deleted = |changes: &[StateChange]| {
        changes
            .iter()
            .any(|c| matches!(c, StateChange::Delete(_, k) if *k == key))
    };
    // "a" expires, "b" does not: the segment stays.
    e.on_record(0, 2, &order("c", T0 + HORIZON + MIN), 0, &mut out);
    for _ in 0..3 {
        assert!(!deleted(&flush(&mut e)), "tombstoned while b is live");
    }
    // Every entry expired, under a durable watermark: tombstoned once.
    e.on_record(0, 3, &order("d", T0 + 5 * MIN + HORIZON + MIN), 0, &mut out);
    let mut tombstones = 0;
    for _ in 0..3 {
        tombstones += usize::from(deleted(&flush(&mut e)));
    }
    assert_eq!(tombstones, 1);
}

/// The changelog, compacted: the last value of each key. A restore from
/// it alone (no per-id rows) recognises a resent order.
#[test]
fn a_pod_restored_from_segments_recognises_duplicates() {
    let mut e = engine();
    let mut out = Vec::new();
    let mut log: BTreeMap<String, StateRow> = BTreeMap::new();
    for i in 0..100i64 {
        e.on_record(0, i, &order(&format!("o{i}"), T0 + i), 0, &mut out);
        if i % 10 == 9 {
            for c in flush(&mut e) {
                match c {
                    StateChange::Put(_, row) => {
                        log.insert(format!("{:?}", row.key()), row);
                    }
                    StateChange::Delete(_, k) => {
                        log.remove(&format!("{k:?}"));
                    }
                }
            }
        }
    }
    let mut r = engine();
    let mut out = Vec::new();
    r.restore(0, log.into_values(), 0, &mut out);
    out.clear();
    r.on_record(0, 100, &order("o42", T0 + 42), 0, &mut out);
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::Duplicate { order_id, .. } if order_id == "o42")),
        "{out:?}"
    );
}

/// An id seen again after its first entry expired has two entries in two
/// segments until the older one is tombstoned. Whatever order a restore
/// meets them in, the later entry (the higher offset) is the one kept.
#[test]
fn of_two_entries_for_one_id_the_later_one_is_restored() {
    let seg = |seq: i64, t: i64, offset: i64| {
        StateRow::DedupSegment(
            seq,
            0,
            DedupSegment {
                expire_ms: t + HORIZON,
                entries: vec![(
                    "x".to_string(),
                    DedupRow {
                        event_ms: t,
                        offset,
                    },
                )],
            },
        )
    };
    let old = seg(1, T0, 0);
    let new = seg(50, T0 + 2 * HORIZON, 40);
    let meta = StateRow::Meta(tally_core::PartitionMeta {
        next_offset: 60,
        max_event_ms: Some(T0 + 2 * HORIZON),
        watermark: Some(T0 + 2 * HORIZON),
    });
    for rows in [
        vec![old.clone(), new.clone(), meta.clone()],
        vec![new.clone(), old.clone(), meta.clone()],
    ] {
        let mut r = engine();
        let mut out = Vec::new();
        r.restore(0, rows, 0, &mut out);
        out.clear();
        r.on_record(0, 60, &order("x", T0 + 2 * HORIZON + 1), 0, &mut out);
        assert!(
            out.iter().any(|e| matches!(e, Effect::Duplicate { .. })),
            "x counted again: {out:?}"
        );
    }
}

/// A new segment may take an old one's key: a pod that died after a
/// segment was acknowledged and before the partition meta that follows
/// it resumes below that segment's offset, and may seal a flush at the
/// same offset again. The old segment's schedule must not tombstone the
/// new one. Checked to fail without the engine dropping the old key's
/// schedule: the key was tombstoned at the old segment's expiry, while
/// the new one's entries were live.
#[test]
fn a_segment_written_again_under_its_key_is_not_tombstoned_by_the_old_schedule() {
    let old = StateRow::DedupSegment(
        2,
        0,
        DedupSegment {
            expire_ms: T0 + HORIZON,
            entries: vec![(
                "a".to_string(),
                DedupRow {
                    event_ms: T0,
                    offset: 0,
                },
            )],
        },
    );
    // The meta that lagged: the pod resumes at offset 0.
    let meta = StateRow::Meta(tally_core::PartitionMeta {
        next_offset: 0,
        max_event_ms: None,
        watermark: None,
    });
    let mut e = engine();
    let mut out = Vec::new();
    e.restore(0, vec![old, meta], 0, &mut out);
    // Sealed at offset 2 again, with entries that live longer.
    e.on_record(0, 0, &order("x", T0), 0, &mut out);
    e.on_record(0, 1, &order("b", T0 + 5 * MIN), 0, &mut out);
    let first = flush(&mut e);
    assert!(
        first.iter().any(|c| matches!(
            c,
            StateChange::Put(_, StateRow::DedupSegment(2, 0, s)) if s.entries.len() == 2
        )),
        "{first:?}"
    );
    // Past the old segment's expiry, not the new one's.
    e.on_record(0, 2, &order("c", T0 + HORIZON + MIN), 0, &mut out);
    for _ in 0..3 {
        let changes = flush(&mut e);
        assert!(
            !changes
                .iter()
                .any(|c| matches!(c, StateChange::Delete(_, RowKey::DedupSegment(2, 0)))),
            "the new segment was tombstoned on the old one's schedule"
        );
    }
}
