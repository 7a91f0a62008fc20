//! Bounded serving state : a closed window is served
//! for `window_retention_ms` of event time after its end, then tombstoned
//! (an [`Effect::Expired`] per partial) by its pod, once that expiry is
//! durable, and dropped whole by every view. The schedule is state (an
//! `Expiry` row), so a restore keeps it.
//!
//! How these were checked to fail: before this change neither mechanism
//! existed (only session retractions were tombstoned, and the view kept
//! every window). With the engine's tombstones and the view's drop
//! switched off, the tests fail: no `Expired` effect ("left: []"), and
//! the view still serves all three windows.

use std::collections::BTreeMap;

use tally_core::aggregate::PartialAgg;
use tally_core::view::{ProgressRecord, View, ViewUpdate, WindowPartial, WindowQuery};
use tally_core::{CoreConfig, Effect, Engine, FxTable, GroupBy, StateChange, StateRow, WindowSpec};

const T0: i64 = 1_699_999_980_000;
const MIN: i64 = 60_000;
const RETENTION: i64 = 3 * MIN;

fn config() -> CoreConfig {
    CoreConfig {
        windows: vec![WindowSpec::tumbling("t", MIN, GroupBy::Currency)],
        out_of_orderness_ms: 0,
        grace_ms: 0,
        window_retention_ms: RETENTION,
        ..CoreConfig::default()
    }
}

fn order(id: usize, t_ms: i64) -> Vec<u8> {
    format!(
        r#"{{"order_id":"o{id}","customer_id":"c","amount":10,"currency":"USD","created_at":{t_ms}}}"#
    )
    .into_bytes()
}

/// Drives one partition of an engine: records, flushes made durable at
/// once, and the store those flushes build.
struct Pod {
    engine: Engine,
    next: i64,
    store: BTreeMap<String, StateRow>,
    expired: Vec<i64>,
}

impl Pod {
    fn new(engine: Engine) -> Pod {
        Pod {
            engine,
            next: 0,
            store: BTreeMap::new(),
            expired: Vec::new(),
        }
    }

    fn feed(&mut self, t_ms: i64) {
        let mut out = Vec::new();
        self.engine
            .on_record(0, self.next, &order(self.next as usize, t_ms), 0, &mut out);
        self.next += 1;
        self.take(out);
        self.flush();
    }

    fn flush(&mut self) {
        let (mut out, mut changes) = (Vec::new(), Vec::new());
        let id = self.engine.flush(&mut out, &mut changes);
        self.take(out);
        for c in changes {
            match c {
                StateChange::Put(_, row) => {
                    self.store.insert(format!("{:?}", row.key()), row);
                }
                StateChange::Delete(_, key) => {
                    self.store.remove(&format!("{key:?}"));
                }
            }
        }
        self.engine.on_durable(id);
    }

    fn take(&mut self, out: Vec<Effect>) {
        for e in out {
            if let Effect::Expired { key, .. } = e {
                self.expired.push(key.start);
            }
        }
    }

    fn expiry_rows(&self) -> usize {
        self.store
            .values()
            .filter(|r| matches!(r, StateRow::Expiry(..)))
            .count()
    }
}

fn engine() -> Engine {
    let mut e = Engine::new(config(), FxTable::with_defaults()).unwrap();
    e.assign(0, 0);
    e
}

#[test]
fn a_closed_window_is_tombstoned_once_its_retention_is_durable() {
    let mut pod = Pod::new(engine());
    pod.feed(T0 + 1_000);
    pod.feed(T0 + MIN + 1_000); // closes [T0, T0+1m)
    assert_eq!(
        pod.expiry_rows(),
        1,
        "the close schedules the expiry as state"
    );
    // Up to its end plus retention, exclusive: still served.
    pod.feed(T0 + MIN + RETENTION - 1);
    pod.flush();
    assert!(pod.expired.is_empty(), "{:?}", pod.expired);
    pod.feed(T0 + MIN + RETENTION);
    // The expiry became durable with that flush; the next flush tombstones.
    pod.flush();
    assert_eq!(pod.expired, vec![T0]);
    assert!(
        !pod.store
            .values()
            .any(|r| matches!(r, StateRow::Expiry(k, _) if k.start == T0)),
        "the expired window's schedule is deleted"
    );
    // Never twice.
    pod.feed(T0 + 10 * MIN);
    pod.flush();
    assert_eq!(pod.expired.iter().filter(|s| **s == T0).count(), 1);
}

#[test]
fn a_restored_partition_keeps_its_expiry_schedule() {
    let mut pod = Pod::new(engine());
    pod.feed(T0 + 1_000);
    pod.feed(T0 + MIN + 1_000);
    let rows: Vec<StateRow> = pod.store.values().cloned().collect();
    assert!(rows.iter().any(
        |r| matches!(r, StateRow::Expiry(k, at) if k.start == T0 && *at == T0 + MIN + RETENTION)
    ));
    // A new pod restores from the store; the schedule comes with it.
    let mut e = engine();
    let mut out = Vec::new();
    e.restore(0, rows, 0, &mut out);
    let mut restored = Pod::new(e);
    restored.next = pod.next;
    restored.store = pod.store.clone();
    restored.feed(T0 + 2 * MIN + RETENTION);
    restored.flush();
    assert!(restored.expired.contains(&T0), "{:?}", restored.expired);
    assert!(
        restored.expired.contains(&(T0 + MIN)),
        "{:?}",
        restored.expired
    );
    assert!(
        !restored
            .store
            .values()
            .any(|r| matches!(r, StateRow::Expiry(k, _) if k.start == T0)),
        "the tombstoned window's schedule left the state"
    );
}

#[test]
fn retention_shorter_than_grace_is_refused_naming_the_field() {
    let cfg = CoreConfig {
        grace_ms: 10_000,
        window_retention_ms: 5_000,
        ..config()
    };
    let err = Engine::new(cfg, FxTable::with_defaults()).err().unwrap();
    assert_eq!(err.field, "window_retention_ms");
}

fn partial(p: i32, start: i64, usd: i128) -> ViewUpdate {
    ViewUpdate::Window(
        p,
        Box::new(WindowPartial {
            spec: "t".into(),
            kind: "tumbling".into(),
            by: "currency".into(),
            key: "USD".into(),
            start,
            end: start + MIN,
            is_final: true,
            epoch: 1,
            agg: PartialAgg {
                count: 1,
                revenue_usd_micros: usd,
                ..PartialAgg::default()
            },
        }),
    )
}

fn progress(p: i32, wm: i64) -> ViewUpdate {
    ViewUpdate::Progress(ProgressRecord {
        partition: p,
        next_offset: 1,
        watermark: Some(wm),
        idle: false,
        epoch: 1,
    })
}

fn totals(v: &View) -> Vec<(i64, i128)> {
    v.windows(&WindowQuery {
        kind: "tumbling".into(),
        by: "currency".into(),
        ..WindowQuery::default()
    })
    .iter()
    .map(|w| (w.start, w.revenue_usd_micros))
    .collect()
}

#[test]
fn the_view_drops_windows_whole_past_their_retention() {
    let mut v = View::new(0);
    v.set_input_partitions(2);
    v.set_retention(RETENTION);
    for k in 0..3 {
        for p in 0..2 {
            v.apply(partial(p, T0 + k * MIN, 10));
        }
    }
    v.apply(progress(0, T0 + 3 * MIN));
    v.apply(progress(1, T0 + 3 * MIN));
    assert_eq!(v.len(), 3);
    // Partition 0 is ahead: its pod tombstones its partial of the first
    // window. The view keeps serving the window whole, never half of it.
    v.apply(ViewUpdate::Tombstone(format!("t|USD|{T0}"), 0));
    v.apply(progress(0, T0 + MIN + RETENTION));
    assert_eq!(totals(&v)[0], (T0, 20));
    // Partition 1 catches up: the global watermark passes the first
    // window's end plus retention, and it goes whole.
    v.apply(progress(1, T0 + MIN + RETENTION));
    assert_eq!(
        totals(&v),
        vec![(T0 + MIN, 20), (T0 + 2 * MIN, 20)],
        "only the expired window left"
    );
    assert_eq!(v.expired(), 1);
    // A row of it read late does not bring it back.
    v.apply(partial(1, T0, 10));
    assert_eq!(v.len(), 2);
}
