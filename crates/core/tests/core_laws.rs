//! The core's laws, as property tests (1,000 cases each).
//!
//! 1. Any arrival order whose disorder stays within the allowed
//!    out-of-orderness gives final windows equal to a batch computation (the
//!    oracle below, written independently of the engine's assigners).
//! 2. Re-feeding an already-applied prefix changes nothing; a crash after a
//!    flush that was cut in half, followed by restore and replay, gives the
//!    same final windows as an uninterrupted run.
//! 3. Sessions do not depend on arrival order within bounds.
//! 4. Aggregates over any split into partitions, merged in any grouping,
//!    equal the aggregate over everything (p95 within the sketch's bound).
//! 5. Announcing open results between flushes changes no state change and
//!    no other effect; at every flush the results seen downstream are the
//!    same as without it, and right after an announcement they are
//!    current.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;
use support::{order_json, T0};
use tally_core::order::usd_micros;
use tally_core::sketch::RELATIVE_ACCURACY;
use tally_core::{
    customer_hash, Aggregate, CoreConfig, Currency, Effect, Engine, FxTable, GroupBy, StateChange,
    StateRow, WindowKind, WindowRow, WindowSpec,
};

const OOO: i64 = 5_000;
const CURRENCIES: [&str; 3] = ["USD", "EUR", "JPY"];
const REGIONS: [&str; 3] = ["eu", "us", "apac"];

#[derive(Clone, Debug)]
struct Ev {
    id: usize,
    customer: u8,
    cur: u8,
    region: u8,
    t: i64,
    cents: i64,
}

impl Ev {
    fn bytes(&self) -> Vec<u8> {
        order_json(
            &format!("o{}", self.id),
            &format!("c{}", self.customer),
            self.cents,
            CURRENCIES[self.cur as usize],
            T0 + self.t,
            REGIONS[self.region as usize],
        )
    }
    fn group(&self, by: GroupBy) -> String {
        match by {
            GroupBy::Currency => CURRENCIES[self.cur as usize].to_string(),
            GroupBy::Region => REGIONS[self.region as usize].to_string(),
            GroupBy::Customer => format!("c{}", self.customer),
        }
    }
}

/// Events over ~25 minutes, with times on round seconds, round minutes and
/// odd milliseconds so that window edges are hit often.
fn events() -> impl Strategy<Value = Vec<Ev>> {
    let time = prop_oneof![
        (0i64..25).prop_map(|m| m * 60_000),
        (0i64..1_500).prop_map(|s| s * 1_000),
        0i64..1_500_000,
    ];
    prop::collection::vec((0u8..6, 0u8..3, 0u8..3, time, 1i64..2_000_000), 1..60).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(id, (customer, cur, region, t, cents))| Ev {
                id,
                customer,
                cur,
                region,
                t,
                cents,
            })
            .collect()
    })
}

/// A stream: events plus some exact redeliveries, each with an arrival
/// jitter in [0, OOO]. Sorting by `t + jitter` keeps every event's disorder
/// within OOO: anything that arrived before it has `t' ≤ t + OOO`.
fn stream() -> impl Strategy<Value = (Vec<Ev>, Vec<(usize, i64)>, i64, i32)> {
    events()
        .prop_flat_map(|evs| {
            let n = evs.len();
            (
                Just(evs),
                prop::collection::vec((0..n, 0..=OOO), n..n * 3 / 2 + 1),
                0i64..=10_000,
                1i32..=3,
            )
        })
        .prop_map(|(evs, picks, grace, parts)| {
            // Every event once (index i with a jitter), then some duplicates.
            let mut arrivals: Vec<(usize, i64)> = picks
                .iter()
                .enumerate()
                .take(evs.len())
                .map(|(i, (_, j))| (i, *j))
                .collect();
            arrivals.extend(picks.iter().skip(evs.len()).copied());
            (evs, arrivals, grace, parts)
        })
}

fn config(grace: i64) -> CoreConfig {
    CoreConfig {
        windows: vec![
            WindowSpec::tumbling("tc", 60_000, GroupBy::Currency),
            WindowSpec::tumbling("tr", 60_000, GroupBy::Region),
            WindowSpec::sliding("sr", 300_000, 60_000, GroupBy::Region),
            WindowSpec::session("sc", 120_000),
        ],
        out_of_orderness_ms: OOO,
        grace_ms: grace,
        dedup_horizon_ms: 3_600_000,
        ..CoreConfig::default()
    }
}

/// (partition, offset, bytes) in arrival order; a customer always maps to the
/// same partition, as with Kafka's keyed partitioning.
fn arrival_order(evs: &[Ev], arrivals: &[(usize, i64)], parts: i32) -> Vec<(i32, i64, Vec<u8>)> {
    let mut order: Vec<(i64, usize, usize)> = arrivals
        .iter()
        .enumerate()
        .map(|(k, (i, j))| (evs[*i].t + j, k, *i))
        .collect();
    order.sort();
    let mut next = vec![0i64; parts as usize];
    order
        .into_iter()
        .map(|(_, _, i)| {
            let p = i32::from(evs[i].customer) % parts;
            let o = next[p as usize];
            next[p as usize] += 1;
            (p, o, evs[i].bytes())
        })
        .collect()
}

type Finals = BTreeMap<(u16, String, i64), (i64, Aggregate)>;

/// The batch oracle: straightforward window arithmetic over the unique events.
fn oracle(cfg: &CoreConfig, evs: &[Ev]) -> Finals {
    let fx = FxTable::with_defaults();
    let mut out: Finals = BTreeMap::new();
    let add = |agg: &mut Aggregate, e: &Ev| {
        let cur = Currency::parse(CURRENCIES[e.cur as usize]).unwrap();
        let amount = e.cents * 10_000;
        agg.add(
            usd_micros(amount, fx.get(cur).unwrap()).unwrap(),
            cur,
            amount,
            customer_hash(&format!("c{}", e.customer)),
        );
    };
    for (si, spec) in cfg.windows.iter().enumerate() {
        let si = si as u16;
        match spec.kind {
            WindowKind::Tumbling { size_ms } => {
                for e in evs {
                    let t = T0 + e.t;
                    let start = t.div_euclid(size_ms) * size_ms;
                    let w = out
                        .entry((si, e.group(spec.by), start))
                        .or_insert((start + size_ms, Aggregate::default()));
                    add(&mut w.1, e);
                }
            }
            WindowKind::Sliding { size_ms, slide_ms } => {
                for e in evs {
                    let t = T0 + e.t;
                    let mut s = (t - size_ms).div_euclid(slide_ms) * slide_ms;
                    while s <= t {
                        if t < s + size_ms {
                            let w = out
                                .entry((si, e.group(spec.by), s))
                                .or_insert((s + size_ms, Aggregate::default()));
                            add(&mut w.1, e);
                        }
                        s += slide_ms;
                    }
                }
            }
            WindowKind::Session { gap_ms } => {
                let mut by_customer: BTreeMap<u8, Vec<&Ev>> = BTreeMap::new();
                for e in evs {
                    by_customer.entry(e.customer).or_default().push(e);
                }
                for (c, mut list) in by_customer {
                    list.sort_by_key(|e| e.t);
                    let mut cur: Option<(i64, i64, Aggregate)> = None;
                    for e in list {
                        let t = T0 + e.t;
                        match &mut cur {
                            Some((_, last, agg)) if t - *last < gap_ms => {
                                *last = t;
                                add(agg, e);
                            }
                            _ => {
                                if let Some((first, last, agg)) = cur.take() {
                                    out.insert((si, format!("c{c}"), first), (last, agg));
                                }
                                let mut agg = Aggregate::default();
                                add(&mut agg, e);
                                cur = Some((t, t, agg));
                            }
                        }
                    }
                    if let Some((first, last, agg)) = cur {
                        out.insert((si, format!("c{c}"), first), (last, agg));
                    }
                }
            }
        }
    }
    out
}

/// Folds effects into per-partition final rows; panics if a window emits two
/// different finals. Returns the results merged across partitions.
#[derive(Default)]
struct Collector {
    per_part: HashMap<(i32, u16, String, i64), WindowRow>,
    live: HashSet<(i32, u16, String, i64)>,
    /// After a restore, progress updates of already-final windows are ignored.
    replaying: bool,
}

impl Collector {
    fn take(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::Window(w) => {
                    let k = (w.partition, w.key.spec, w.key.group.clone(), w.key.start);
                    if w.is_final() {
                        if let Some(prev) = self.per_part.get(&k) {
                            assert_eq!(prev, &w.row, "a window's final result changed: {k:?}");
                        }
                        self.per_part.insert(k.clone(), w.row.clone());
                        self.live.remove(&k);
                    } else if self.per_part.contains_key(&k) {
                        assert!(self.replaying, "update after final: {k:?}");
                    } else {
                        self.live.insert(k);
                    }
                }
                Effect::Retracted { partition, key, .. } => {
                    let k = (*partition, key.spec, key.group.clone(), key.start);
                    assert!(
                        !self.per_part.contains_key(&k),
                        "retracted a final window: {k:?}"
                    );
                    self.live.remove(&k);
                }
                _ => {}
            }
        }
    }

    fn merged(&self) -> Finals {
        let mut out: Finals = BTreeMap::new();
        for ((_, s, g, start), row) in &self.per_part {
            let w = out
                .entry((*s, g.clone(), *start))
                .or_insert((row.end, Aggregate::default()));
            assert_eq!(w.0, row.end);
            w.1.merge(&row.agg);
        }
        out
    }
}

fn unique(evs: &[Ev]) -> Vec<Ev> {
    evs.to_vec()
}

fn assert_same(got: &Finals, want: &Finals) -> Result<(), TestCaseError> {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    prop_assert!(
        missing.is_empty() && extra.is_empty(),
        "missing windows {:?}, unexpected windows {:?}",
        missing,
        extra
    );
    for (k, (end, agg)) in want {
        let (gend, gagg) = &got[k];
        prop_assert_eq!(end, gend, "end of {:?}", k);
        prop_assert_eq!(agg, gagg, "aggregate of {:?}", k);
    }
    Ok(())
}

fn run_all(
    cfg: &CoreConfig,
    input: &[(i32, i64, Vec<u8>)],
    parts: i32,
    flush_every: usize,
) -> (Collector, Vec<Effect>) {
    let mut engine = Engine::new(cfg.clone(), FxTable::with_defaults()).unwrap();
    let mut col = Collector::default();
    let mut all = Vec::new();
    for p in 0..parts {
        engine.assign(p, 0);
    }
    for (n, (p, o, bytes)) in input.iter().enumerate() {
        let mut out = Vec::new();
        engine.on_record(*p, *o, bytes, 0, &mut out);
        if flush_every > 0 && n % flush_every == 0 {
            let mut changes = Vec::new();
            let id = engine.flush(&mut out, &mut changes);
            engine.on_durable(id);
        }
        col.take(&out);
        all.extend(out);
    }
    let mut out = Vec::new();
    for p in 0..parts {
        engine.finish(p, &mut out);
    }
    col.take(&out);
    all.extend(out);
    (col, all)
}

/// Runs `input` with a flush every `flush_every` records and crashes at
/// `crash_at` (a fraction of the input) in the middle of a flush: a prefix
/// (`torn`) of its outputs and the state changes for which `landed(change,
/// index, count)` holds reach the outside. Then a new engine restores the
/// durable rows and replays everything; its finals must equal an
/// uninterrupted run's.
#[allow(clippy::too_many_arguments)]
fn crash_then_replay(
    evs: &[Ev],
    arrivals: &[(usize, i64)],
    grace: i64,
    parts: i32,
    flush_every: usize,
    crash_at: f64,
    torn: f64,
    landed: &dyn Fn(&StateChange, usize, usize) -> bool,
) -> Result<(), TestCaseError> {
    let cfg = config(grace);
    let input = arrival_order(evs, arrivals, parts);
    let (reference, _) = run_all(&cfg, &input, parts, flush_every);

    let mut store: BTreeMap<(i32, String), StateRow> = BTreeMap::new();
    let apply = |store: &mut BTreeMap<(i32, String), StateRow>, c: &StateChange| match c {
        StateChange::Put(p, row) => {
            store.insert((*p, format!("{:?}", row.key())), row.clone());
        }
        StateChange::Delete(p, k) => {
            store.remove(&(*p, format!("{k:?}")));
        }
    };
    let mut col = Collector::default();
    let mut engine = Engine::new(cfg.clone(), FxTable::with_defaults()).unwrap();
    let crash = ((input.len() as f64) * crash_at) as usize;
    // Effects leave the process only at a flush, as in the pod.
    let mut pending = Vec::new();
    for (n, (p, o, b)) in input.iter().enumerate() {
        engine.on_record(*p, *o, b, 0, &mut pending);
        if n % flush_every == 0 || n == crash {
            let mut changes = Vec::new();
            let id = engine.flush(&mut pending, &mut changes);
            if n == crash {
                // The crash: a prefix of this flush's outputs and the
                // state rows `landed` says got out; nothing else did.
                let sent = ((pending.len() as f64) * torn) as usize;
                col.take(&pending[..sent]);
                let n = changes.len();
                for (i, c) in changes.iter().enumerate() {
                    if landed(c, i, n) {
                        apply(&mut store, c);
                    }
                }
                pending.clear();
                break;
            }
            col.take(&pending);
            pending.clear();
            for c in &changes {
                apply(&mut store, c);
            }
            engine.on_durable(id);
        }
    }
    // A new process: restore each partition, then replay everything,
    // flushing as it goes. A final is sticky downstream: a replayed
    // window may report progress again before it closes again.
    col.replaying = true;
    let mut engine = Engine::new(cfg, FxTable::with_defaults()).unwrap();
    let mut out = Vec::new();
    for p in 0..parts {
        let rows: Vec<StateRow> = store
            .iter()
            .filter(|((sp, _), _)| *sp == p)
            .map(|(_, r)| r.clone())
            .collect();
        engine.restore(p, rows, 0, &mut out);
    }
    for (n, (p, o, b)) in input.iter().enumerate() {
        engine.on_record(*p, *o, b, 0, &mut out);
        if n % (flush_every + 1) == 0 {
            let mut changes = Vec::new();
            let id = engine.flush(&mut out, &mut changes);
            engine.on_durable(id);
        }
    }
    for p in 0..parts {
        engine.finish(p, &mut out);
    }
    col.take(&out);
    assert_same(&col.merged(), &reference.merged())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Law 1: bounded disorder gives the batch result, with nothing late,
    /// whatever seed the engine's hash maps get.
    #[test]
    fn bounded_disorder_equals_batch((evs, arrivals, grace, parts) in stream(), flush_every in 0usize..7, seed in any::<u64>()) {
        let cfg = CoreConfig { hash_seed: seed, ..config(grace) };
        let input = arrival_order(&evs, &arrivals, parts);
        let (col, all) = run_all(&cfg, &input, parts, flush_every);
        let late = all.iter().filter(|e| matches!(e, Effect::Late { .. })).count();
        prop_assert_eq!(late, 0);
        let partial = all.iter().filter(|e| matches!(e, Effect::Accepted { late_windows, .. } if *late_windows > 0)).count();
        prop_assert_eq!(partial, 0);
        let dups = all.iter().filter(|e| matches!(e, Effect::Duplicate { .. })).count();
        prop_assert_eq!(dups, arrivals.len() - evs.len());
        prop_assert!(col.live.is_empty(), "windows left open after finish: {:?}", col.live);
        assert_same(&col.merged(), &oracle(&cfg, &unique(&evs)))?;
    }

    /// Law 2a: re-feeding any already-applied prefix changes nothing.
    #[test]
    fn refeeding_an_applied_prefix_changes_nothing((evs, arrivals, grace, parts) in stream(), cut in 0.0f64..1.0, again in 0.0f64..1.0) {
        let cfg = config(grace);
        let input = arrival_order(&evs, &arrivals, parts);
        let k = ((input.len() as f64) * cut) as usize;
        let mut engine = Engine::new(cfg, FxTable::with_defaults()).unwrap();
        let (mut out, mut changes) = (Vec::new(), Vec::new());
        for (p, o, b) in &input[..k] {
            engine.on_record(*p, *o, b, 0, &mut out);
        }
        engine.flush(&mut out, &mut changes);
        let before = engine.snapshot();
        let j = ((k as f64) * again) as usize;
        let (mut out2, mut changes2) = (Vec::new(), Vec::new());
        for (p, o, b) in &input[j..k] {
            engine.on_record(*p, *o, b, 0, &mut out2);
        }
        engine.flush(&mut out2, &mut changes2);
        prop_assert!(out2.is_empty(), "{:?}", out2);
        prop_assert!(changes2.is_empty(), "{:?}", changes2);
        prop_assert_eq!(engine.snapshot(), before);
    }

    /// Law 2b: crash after a flush that was cut in half, restore the durable
    /// rows, replay from the start: the finals equal an uninterrupted run.
    #[test]
    fn crash_mid_flush_then_replay_is_exact(
        (evs, arrivals, grace, parts) in stream(),
        flush_every in 1usize..6,
        crash_at in 0.0f64..1.0,
        torn in 0.0f64..1.0,
        torn_state in 0.0f64..1.0,
    ) {
        // A prefix of this flush's state rows got out; nothing else did.
        let landed = |_: &StateChange, i: usize, n: usize| i < ((n as f64) * torn_state) as usize;
        crash_then_replay(&evs, &arrivals, grace, parts, flush_every, crash_at, torn, &landed)?;
    }

    /// Law 2c: the changelog is not a prefix of a flush. A producer may
    /// deliver a failed record again after later ones of the same flush
    /// were acknowledged, so a crash can leave any subset of what was in
    /// flight. The pod sends a flush's changes group by group
    /// (`StateChange::group`, waiting for each group's acks), so what a
    /// crash leaves is every change of the groups before some `k` plus any
    /// subset of group `k`: restore that, replay from the start, and the
    /// finals equal an uninterrupted run.
    ///
    /// Checked that the grouping matters (a torn flush
    /// reproduced here): the same law with any subset of the whole flush,
    /// no groups, fails on its first cases with "a window's final result
    /// changed".
    #[test]
    fn crash_with_any_subset_of_a_group_then_replay_is_exact(
        (evs, arrivals, grace, parts) in stream(),
        flush_every in 1usize..6,
        crash_at in 0.0f64..1.0,
        torn in 0.0f64..1.0,
        cut in 0..tally_core::CHANGE_GROUPS,
        subset in prop::collection::vec(any::<bool>(), 256),
    ) {
        let landed = |c: &StateChange, i: usize, _: usize| {
            c.group() < cut || (c.group() == cut && subset[i % subset.len()])
        };
        crash_then_replay(&evs, &arrivals, grace, parts, flush_every, crash_at, torn, &landed)?;
    }

    /// Law 3: sessions (ids, spans and aggregates) are the same for any two
    /// arrival orders within bounds.
    #[test]
    fn sessions_do_not_depend_on_arrival_order(evs in events(), j1 in prop::collection::vec(0..=OOO, 60), j2 in prop::collection::vec(0..=OOO, 60)) {
        let cfg = config(0);
        let a1: Vec<(usize, i64)> = (0..evs.len()).map(|i| (i, j1[i])).collect();
        let a2: Vec<(usize, i64)> = (0..evs.len()).map(|i| (i, j2[i])).collect();
        let sessions = |arrivals: &[(usize, i64)]| {
            let (col, _) = run_all(&cfg, &arrival_order(&evs, arrivals, 1), 1, 3);
            col.merged().into_iter().filter(|(k, _)| k.0 == 3).collect::<Finals>()
        };
        assert_same(&sessions(&a1), &sessions(&a2))?;
    }

    /// Law 5: announcements (`Engine::announce`, at any points) only
    /// bring results forward. Runs the same input with and without them:
    /// every flush's state changes are equal, the effects other than
    /// window results are equal, and at each flush the latest result per
    /// window downstream (retractions and expiries remove it) is equal;
    /// right after an announcement, every open window's latest result
    /// downstream is its current one.
    ///
    /// Seen to fail ("window … is stale after an announcement") with
    /// `announce` emitting nothing, and with a change after an
    /// announcement not marking its window unannounced again (then
    /// neither the next announcement nor the flush emitted it).
    #[test]
    fn announcing_changes_no_state_and_no_final_result(
        (evs, arrivals, grace, parts) in stream(),
        flush_every in 1usize..7,
        announce_at in prop::collection::vec(any::<bool>(), 120),
    ) {
        let cfg = config(grace);
        let input = arrival_order(&evs, &arrivals, parts);
        let plain = announced_run(&cfg, &input, parts, flush_every, &[])?;
        let with = announced_run(&cfg, &input, parts, flush_every, &announce_at)?;
        prop_assert_eq!(plain.changes.len(), with.changes.len());
        for (n, (a, b)) in plain.changes.iter().zip(&with.changes).enumerate() {
            prop_assert_eq!(a, b, "state changes of flush {}", n);
        }
        prop_assert_eq!(&plain.others, &with.others);
        prop_assert_eq!(plain.views.len(), with.views.len());
        for (n, (a, b)) in plain.views.iter().zip(&with.views).enumerate() {
            prop_assert_eq!(a, b, "downstream results differ at flush {}", n);
        }
    }

    /// Law 4: merge is exact, associative and commutative; p95 stays in bound.
    #[test]
    fn aggregates_merge_across_any_split(
        orders in prop::collection::vec((1i64..50_000_000_000, 0u8..3, 0u8..20, 0usize..4), 1..200),
    ) {
        let item = |&(usd, cur, cust, _): &(i64, u8, u8, usize)| {
            (usd, Currency::parse(CURRENCIES[cur as usize]).unwrap(), usd / 2 + 1, customer_hash(&format!("c{cust}")))
        };
        let mut whole = Aggregate::default();
        let mut parts = vec![Aggregate::default(); 4];
        for o in &orders {
            let (usd, cur, amount, cust) = item(o);
            whole.add(usd, cur, amount, cust);
            parts[o.3].add(usd, cur, amount, cust);
        }
        let mut left = parts[0].clone();
        for p in &parts[1..] {
            left.merge(p);
        }
        let mut right = parts[3].clone();
        for p in parts[..3].iter().rev() {
            right.merge(p);
        }
        let mut ab = parts[0].clone();
        ab.merge(&parts[1]);
        let mut cd = parts[2].clone();
        cd.merge(&parts[3]);
        ab.merge(&cd);
        prop_assert_eq!(&left, &whole);
        prop_assert_eq!(&right, &whole);
        prop_assert_eq!(&ab, &whole);
        let mut values: Vec<i64> = orders.iter().map(|o| o.0).collect();
        values.sort();
        let exact = values[((values.len() - 1) as f64 * 0.95).floor() as usize] as f64 / 1e6;
        let p95 = left.p95_usd().unwrap();
        prop_assert!((p95 - exact).abs() <= RELATIVE_ACCURACY * exact * (1.0 + 1e-9), "p95 {} vs exact {}", p95, exact);
    }
}

/// What [`announced_run`] saw.
struct Announced {
    /// Each flush's state changes.
    changes: Vec<Vec<StateChange>>,
    /// Every effect that is not a window result, a retraction or an expiry.
    others: Vec<String>,
    /// At each flush (and at the end), the latest result per window
    /// downstream.
    views: Vec<BTreeMap<(i32, u16, String, i64), WindowRow>>,
}

/// Runs `input` with a flush every `flush_every` records and an
/// announcement after record `n` where `announce_at[n]` holds. Checks
/// after each announcement that every open window's latest result
/// downstream is current.
fn announced_run(
    cfg: &CoreConfig,
    input: &[(i32, i64, Vec<u8>)],
    parts: i32,
    flush_every: usize,
    announce_at: &[bool],
) -> Result<Announced, TestCaseError> {
    type Key = (i32, u16, String, i64);
    let mut engine = Engine::new(cfg.clone(), FxTable::with_defaults()).unwrap();
    for p in 0..parts {
        engine.assign(p, 0);
    }
    let mut others = Vec::new();
    let mut view: BTreeMap<Key, WindowRow> = BTreeMap::new();
    let take =
        |effects: Vec<Effect>, view: &mut BTreeMap<Key, WindowRow>, others: &mut Vec<String>| {
            for e in effects {
                match e {
                    Effect::Window(w) => {
                        view.insert((w.partition, w.key.spec, w.key.group, w.key.start), w.row);
                    }
                    Effect::Retracted { partition, key, .. }
                    | Effect::Expired { partition, key, .. } => {
                        view.remove(&(partition, key.spec, key.group, key.start));
                    }
                    other => others.push(format!("{other:?}")),
                }
            }
        };
    let mut changes_seen = Vec::new();
    let mut views = Vec::new();
    for (n, (p, o, bytes)) in input.iter().enumerate() {
        let mut out = Vec::new();
        engine.on_record(*p, *o, bytes, 0, &mut out);
        take(out, &mut view, &mut others);
        if announce_at.get(n).copied().unwrap_or(false) {
            let mut out = Vec::new();
            engine.announce(&mut out);
            take(out, &mut view, &mut others);
            for w in engine.snapshot().into_iter().filter(|w| !w.is_final()) {
                let k = (w.partition, w.key.spec, w.key.group.clone(), w.key.start);
                prop_assert_eq!(
                    view.get(&k),
                    Some(&w.row),
                    "window {:?} is stale after an announcement",
                    k
                );
            }
        }
        if n % flush_every == 0 {
            let (mut out, mut changes) = (Vec::new(), Vec::new());
            let id = engine.flush(&mut out, &mut changes);
            engine.on_durable(id);
            take(out, &mut view, &mut others);
            changes_seen.push(changes);
            views.push(view.clone());
        }
    }
    let mut out = Vec::new();
    for p in 0..parts {
        engine.finish(p, &mut out);
    }
    let (mut fl, mut changes) = (Vec::new(), Vec::new());
    engine.flush(&mut fl, &mut changes);
    out.extend(fl);
    take(out, &mut view, &mut others);
    changes_seen.push(changes);
    views.push(view);
    Ok(Announced {
        changes: changes_seen,
        others,
        views,
    })
}
