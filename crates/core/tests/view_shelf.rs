//! The view's sessions on a shelf (every pod materialises every
//! session of the group, ten million at 512 MiB, so they cannot all be in
//! memory): a view that keeps its sessions on a [`SessionShelf`] answers
//! exactly what a view that keeps them in memory answers, for any
//! sequence of session partials (finals, writer epochs, several
//! partitions and definitions), tombstones and progress rows that expire
//! sessions by retention. 1,000 cases, each with the shelf written
//! through (no customer held in memory) and behind write-back caches of
//! one and three customers (of five).
//!
//! How it was checked to fail: with the shelf's `put` skipped when a
//! tombstone empties a session (the customer's list left as it was), the
//! shelved view still served the retracted session; with the retention
//! sweep not reading the shelf, expired sessions stayed served. The
//! write-back cache: with the scan not skipping the customers
//! held in memory, a held customer's sessions were served twice; with the
//! retention sweep not writing back first, a held customer's expired
//! sessions stayed served.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tally_core::aggregate::PartialAgg;
use tally_core::view::{
    ProgressRecord, SessionShelf, ShelvedSession, View, ViewUpdate, WindowPartial, WindowQuery,
};

const MIN: i64 = 60_000;

/// A shelf in a map, as the shell's RocksDB keeps it (a copy of each
/// value: what is read back is what was put, never a shared object).
#[derive(Default, Clone)]
struct MapShelf(Arc<Mutex<BTreeMap<String, Vec<ShelvedSession>>>>);

impl SessionShelf for MapShelf {
    fn get(&self, customer: &str) -> Vec<ShelvedSession> {
        self.0
            .lock()
            .unwrap()
            .get(customer)
            .cloned()
            .unwrap_or_default()
    }

    fn put(&mut self, customer: &str, sessions: &[ShelvedSession]) {
        let mut m = self.0.lock().unwrap();
        if sessions.is_empty() {
            m.remove(customer);
        } else {
            m.insert(customer.to_string(), sessions.to_vec());
        }
    }

    fn scan(&self, f: &mut dyn FnMut(&str, Vec<ShelvedSession>) -> bool) {
        let m = self.0.lock().unwrap().clone();
        for (k, v) in m {
            if !f(&k, v) {
                return;
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// partition, spec (0/1), customer, start minute, length, final, epoch, amount
    Partial(i32, u8, u8, i64, i64, bool, u64, i64),
    /// Retracts (partition, spec, customer, start minute).
    Tombstone(i32, u8, u8, i64),
    /// A partition's watermark, in minutes.
    Progress(i32, i64),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let partial = (
        0i32..2,
        0u8..2,
        0u8..5,
        0i64..30,
        0i64..3,
        any::<bool>(),
        0u64..3,
        1i64..100,
    )
        .prop_map(|(p, s, c, m, l, f, e, a)| Step::Partial(p, s, c, m, l, f, e, a));
    let tomb =
        (0i32..2, 0u8..2, 0u8..5, 0i64..30).prop_map(|(p, s, c, m)| Step::Tombstone(p, s, c, m));
    let progress = (0i32..2, 0i64..60).prop_map(|(p, m)| Step::Progress(p, m));
    prop::collection::vec(prop_oneof![6 => partial, 2 => tomb, 1 => progress], 1..80)
}

fn update(s: &Step) -> ViewUpdate {
    match *s {
        Step::Partial(p, spec, c, m, len, is_final, epoch, amount) => ViewUpdate::Window(
            p,
            Box::new(WindowPartial {
                spec: format!("s{spec}"),
                kind: "session".into(),
                by: "customer".into(),
                key: format!("c{c}"),
                start: m * MIN,
                end: (m + len) * MIN,
                is_final,
                epoch,
                agg: PartialAgg {
                    count: 1,
                    revenue_usd_micros: i128::from(amount),
                    ..PartialAgg::default()
                },
            }),
        ),
        Step::Tombstone(p, spec, c, m) => {
            ViewUpdate::Tombstone(format!("s{spec}|c{c}|{}", m * MIN), p)
        }
        Step::Progress(p, m) => ViewUpdate::Progress(ProgressRecord {
            partition: p,
            next_offset: 1,
            watermark: Some(m * MIN),
            idle: false,
            epoch: 0,
        }),
    }
}

fn answers(v: &View) -> String {
    let all = v.windows(&WindowQuery {
        kind: "session".into(),
        by: "customer".into(),
        ..WindowQuery::default()
    });
    let few = v.windows(&WindowQuery {
        kind: "session".into(),
        by: "customer".into(),
        from: Some(5 * MIN),
        limit: 3,
        ..WindowQuery::default()
    });
    let one: Vec<_> = (0..5)
        .map(|c| v.customer_sessions(&format!("c{c}")))
        .collect();
    format!(
        "{all:?}\n{few:?}\n{one:?}\n{} {} {} {:?}",
        v.len(),
        v.expired(),
        v.stale_ignored(),
        v.kinds()
    )
}

fn view(shelf: Option<(MapShelf, usize)>) -> View {
    let mut v = View::new(0);
    v.set_input_partitions(2);
    if let Some((s, hot)) = shelf {
        v.set_session_shelf(Box::new(s), hot);
    }
    v.set_retention(10 * MIN);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn a_shelved_view_answers_as_one_in_memory(s in steps()) {
        let mut mem = view(None);
        let mut shelved: Vec<View> = [0, 1, 3]
            .into_iter()
            .map(|hot| view(Some((MapShelf::default(), hot))))
            .collect();
        for (i, step) in s.iter().enumerate() {
            mem.apply(update(step));
            for v in &mut shelved {
                v.apply(update(step));
                if i % 8 == 7 {
                    prop_assert_eq!(answers(v), answers(&mem));
                }
            }
        }
        for v in &shelved {
            prop_assert_eq!(answers(v), answers(&mem));
        }
    }
}

/// The shelf holds what the view serves, and nothing once it is retracted.
#[test]
fn sessions_live_on_the_shelf() {
    let shelf = MapShelf::default();
    let mut v = view(Some((shelf.clone(), 0)));
    v.apply(update(&Step::Partial(0, 0, 1, 3, 1, false, 0, 5)));
    assert_eq!(shelf.0.lock().unwrap().len(), 1);
    assert_eq!(v.customer_sessions("c1").len(), 1);
    assert_eq!(v.len(), 1);
    v.apply(update(&Step::Tombstone(0, 0, 1, 3)));
    assert!(shelf.0.lock().unwrap().is_empty());
    assert_eq!(v.len(), 0);
}

/// Behind a write-back cache, the shelf is written only when more
/// customers than the cache holds have changed, then a sixteenth of them
/// (at least one); the view serves held and written-back customers alike.
#[test]
fn the_cache_writes_back_when_full() {
    let shelf = MapShelf::default();
    let mut v = view(Some((shelf.clone(), 2)));
    v.apply(update(&Step::Partial(0, 0, 1, 3, 1, false, 0, 5)));
    v.apply(update(&Step::Partial(0, 0, 2, 3, 1, false, 0, 5)));
    // The same session again, grown.
    v.apply(update(&Step::Partial(0, 0, 1, 3, 2, false, 0, 7)));
    assert!(shelf.0.lock().unwrap().is_empty(), "two customers fit");
    let c1 = v.customer_sessions("c1");
    assert_eq!((c1.len(), c1[0].end), (1, 5 * MIN), "served from memory");
    assert_eq!(v.len(), 2);
    v.apply(update(&Step::Partial(0, 0, 3, 3, 1, false, 0, 5)));
    assert_eq!(
        shelf.0.lock().unwrap().len(),
        1,
        "a third writes one back (a sixteenth of the cache, at least one)"
    );
    for c in ["c1", "c2", "c3"] {
        assert_eq!(v.customer_sessions(c).len(), 1, "{c} is served");
    }
    // Retractions of held and written-back customers alike.
    for c in 1..=3 {
        v.apply(update(&Step::Tombstone(0, 0, c, 3)));
    }
    assert_eq!(v.len(), 0);
    for c in ["c1", "c2", "c3"] {
        assert!(v.customer_sessions(c).is_empty(), "{c} is retracted");
    }
}
