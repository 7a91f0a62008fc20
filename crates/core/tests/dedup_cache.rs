//! State larger than memory, dedup first (issue 16): with a bounded dedup
//! cache ([`Engine::set_dedup_cache`]) the engine keeps only the entries
//! not yet durable and a few clean ones, and reads the others from the
//! durable store (in the pod, RocksDB) through a [`StateReader`].
//!
//! The law: whatever the cache size (zero included: every lookup reads
//! the store), the flush schedule, and whether a flush becomes durable
//! before or after the next one is sealed, the engine emits exactly what
//! an engine with every entry in memory emits: the same duplicates, the
//! same windows, the same finals; and its store ends with the same dedup
//! entries (expired ones deleted in the same flushes, though the expiry
//! index is the store's then). 1,000 cases.
//!
//! How it was checked to fail: with eviction ignoring the flushes not yet
//! durable (`dedup_inflight` not consulted), the delayed-durability cases
//! counted a duplicate twice; with the reader unused on a miss, every
//! duplicate after an eviction was counted; with the store's expiry index
//! not asked, expired entries stayed in the store.

use std::collections::{BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;
use tally_core::{
    CoreConfig, DedupRow, Effect, Engine, FlushId, FxTable, GroupBy, Partition, RowKey,
    StateChange, StateReader, StateRow, WindowSpec,
};

const T0: i64 = 1_699_999_980_000;
const MIN: i64 = 60_000;

fn config() -> CoreConfig {
    CoreConfig {
        windows: vec![
            WindowSpec::tumbling("t", MIN, GroupBy::Currency),
            WindowSpec::session("s", 2 * MIN),
        ],
        out_of_orderness_ms: 1_000,
        grace_ms: 0,
        // Short, so entries expire within a case and ids come back new.
        dedup_horizon_ms: 5 * MIN,
        window_retention_ms: 5 * MIN,
        ..CoreConfig::default()
    }
}

fn order(id: u8, customer: u8, t_ms: i64) -> Vec<u8> {
    format!(
        r#"{{"order_id":"o{id}","customer_id":"c{customer}","amount":10,"currency":"USD","created_at":{t_ms}}}"#
    )
    .into_bytes()
}

/// The durable store: what flushes made durable, as the pod's RocksDB
/// holds it.
#[derive(Default)]
struct Durable {
    dedup: HashMap<(Partition, String), DedupRow>,
    /// The expiry index: (partition, event time, id) of every entry put.
    index: BTreeSet<(Partition, i64, String)>,
}

impl Durable {
    fn apply(&mut self, changes: &[StateChange]) {
        for c in changes {
            match c {
                StateChange::Put(p, StateRow::Dedup(id, row)) => {
                    self.dedup.insert((*p, id.clone()), *row);
                    self.index.insert((*p, row.event_ms, id.clone()));
                }
                StateChange::Delete(p, RowKey::Dedup(id)) => {
                    self.dedup.remove(&(*p, id.clone()));
                }
                _ => {}
            }
        }
    }
}

impl StateReader for Durable {
    fn dedup(&mut self, p: Partition, order_id: &str) -> Option<DedupRow> {
        self.dedup.get(&(p, order_id.to_string())).copied()
    }

    fn dedup_expiring(&mut self, p: Partition, upto_event_ms: i64) -> Vec<String> {
        let due: Vec<_> = self
            .index
            .iter()
            .filter(|(q, t, _)| *q == p && *t <= upto_event_ms)
            .cloned()
            .collect();
        due.into_iter()
            .map(|k| {
                self.index.remove(&k);
                k.2
            })
            .collect()
    }
}

/// One step of a run.
#[derive(Clone, Debug)]
enum Step {
    /// An order: id (few, so duplicates are common), customer, minutes
    /// after the start plus milliseconds.
    Record(u8, u8, i64),
    /// Seal a flush; make it durable now, or after the next one is sealed.
    Flush { durable_now: bool },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let record = (0u8..12, 0u8..3, 0i64..40_000).prop_map(|(id, c, t)| Step::Record(id, c, t));
    let flush = any::<bool>().prop_map(|durable_now| Step::Flush { durable_now });
    prop::collection::vec(prop_oneof![4 => record, 1 => flush], 1..120)
}

/// Runs the steps over two partitions; time moves forward about a
/// minute every ten records, so windows close and entries expire.
fn run(steps: &[Step], cache: Option<usize>) -> (Vec<Effect>, Vec<(Partition, String, DedupRow)>) {
    let mut engine = Engine::new(config(), FxTable::with_defaults()).unwrap();
    if let Some(n) = cache {
        engine.set_dedup_cache(n);
    }
    let mut store = Durable::default();
    let mut waiting: VecDeque<(FlushId, Vec<StateChange>)> = VecDeque::new();
    let mut out = Vec::new();
    let mut next = [0i64; 2];
    let mut n = 0i64;
    let durable = |engine: &mut Engine, store: &mut Durable, id: FlushId, ch: &[StateChange]| {
        store.apply(ch);
        if cache.is_some() {
            engine.on_durable_in(id, store);
        } else {
            engine.on_durable(id);
        }
    };
    for s in steps {
        match s {
            Step::Record(id, customer, jitter) => {
                let p = Partition::from(*customer % 2);
                let t = T0 + (n / 10) * MIN + jitter;
                let bytes = order(*id, *customer, t);
                let offset = next[p as usize];
                next[p as usize] += 1;
                n += 1;
                if cache.is_some() {
                    engine.on_record_in(p, offset, &bytes, 0, &mut out, &mut store);
                } else {
                    engine.on_record(p, offset, &bytes, 0, &mut out);
                }
            }
            Step::Flush { durable_now } => {
                let mut changes = Vec::new();
                let id = engine.flush(&mut out, &mut changes);
                // An earlier flush waiting: durable now, after this seal.
                while let Some((wid, ch)) = waiting.pop_front() {
                    durable(&mut engine, &mut store, wid, &ch);
                }
                if *durable_now {
                    durable(&mut engine, &mut store, id, &changes);
                } else {
                    waiting.push_back((id, changes));
                }
            }
        }
    }
    let mut changes = Vec::new();
    let id = engine.flush(&mut out, &mut changes);
    while let Some((wid, ch)) = waiting.pop_front() {
        durable(&mut engine, &mut store, wid, &ch);
    }
    durable(&mut engine, &mut store, id, &changes);
    for p in 0..2 {
        engine.finish(p, &mut out);
    }
    let mut stored: Vec<_> = store
        .dedup
        .into_iter()
        .map(|((p, id), row)| (p, id, row))
        .collect();
    stored.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    (out, stored)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn a_bounded_dedup_cache_changes_nothing(s in steps(), cache in 0usize..4) {
        let want = run(&s, None);
        let got = run(&s, Some(cache));
        prop_assert_eq!(got, want);
    }
}

/// With a cache of zero, entries leave memory once durable, and a
/// duplicate of one of them is still recognised (read from the store).
#[test]
fn a_duplicate_of_an_evicted_entry_is_recognised() {
    let steps = vec![
        Step::Record(1, 0, 0),
        Step::Record(2, 0, 10),
        Step::Flush { durable_now: true },
        Step::Record(1, 0, 20),
    ];
    let (out, _) = run(&steps, Some(0));
    let dups = out
        .iter()
        .filter(|e| matches!(e, Effect::Duplicate { .. }))
        .count();
    assert_eq!(dups, 1);
    let mut engine = Engine::new(config(), FxTable::with_defaults()).unwrap();
    engine.set_dedup_cache(0);
    let mut store = Durable::default();
    let mut out = Vec::new();
    engine.on_record_in(0, 0, &order(1, 0, T0), 0, &mut out, &mut store);
    let mut changes = Vec::new();
    let id = engine.flush(&mut out, &mut changes);
    store.apply(&changes);
    engine.on_durable_in(id, &mut store);
    let stats = engine.cache_stats();
    assert_eq!((stats.entries, stats.evicted), (0, 1));
}
