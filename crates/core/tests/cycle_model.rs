//! Model-based property tests of the flush cycle (`tally_core::cycle`).
//!
//! A simulated driver (a producer that may refuse, fail, lose or reorder
//! reports and be purged; a store and a commit that answer late) runs the
//! real [`Cycle`] through random sequences of inputs: records, seals,
//! delivery reports (ok, failed, late ones of batches long gone), assigns
//! and revokes at any step. A simple model (who owns what, which tag is
//! which partition's, what was acknowledged) checks every action as the
//! driver performs it:
//! - a: `Write` only when every record of the batch for the written
//!   partitions is acknowledged; `Commit` only after its `Write` is done;
//! - b: nothing is sent, written or committed for a partition revoked
//!   since the record was made;
//! - c: at the end, with the faults gone, every output of a partition owned
//!   throughout is acknowledged and its batch committed;
//! - d: changelog groups leave in order;
//! - e: no changelog record leaves before the batch's outputs are
//!   acknowledged.
//!
//! 1,000 cases (CI runs them in `make test`).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use tally_core::cycle::{Action, BatchId, Cycle, Lane, Phase, Tag};
use tally_core::CHANGE_GROUPS;

#[derive(Clone, Debug)]
enum Op {
    Assign(i32),
    Revoke(i32),
    /// A record of partition p with n outputs.
    Record(i32, u8),
    /// Seal with changelog rows (partition, group).
    Seal(Vec<(i32, usize)>),
    /// Perform up to n queued actions; refuse a send when the flag is set.
    Drive(u8, bool),
    /// Report the i-th record in flight.
    Deliver(usize, bool),
    /// A report for a tag of a batch that is gone.
    Late(u32, u32),
    ResumeSending,
    StoreDone,
    CommitDone,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..3i32;
    prop_oneof![
        1 => p.clone().prop_map(Op::Assign),
        1 => p.clone().prop_map(Op::Revoke),
        4 => (p.clone(), 0..3u8).prop_map(|(p, n)| Op::Record(p, n)),
        2 => prop::collection::vec((p, 0..CHANGE_GROUPS), 0..6).prop_map(Op::Seal),
        4 => (1..8u8, prop::bool::weighted(0.15)).prop_map(|(n, r)| Op::Drive(n, r)),
        5 => (0..16usize, prop::bool::weighted(0.8)).prop_map(|(i, ok)| Op::Deliver(i, ok)),
        1 => (0..4u32, 0..4u32).prop_map(|(b, i)| Op::Late(b, i)),
        1 => Just(Op::ResumeSending),
        1 => Just(Op::StoreDone),
        1 => Just(Op::CommitDone),
    ]
}

/// What the model knows of one record.
#[derive(Clone, Debug)]
struct Rec {
    partition: i32,
    group: usize,
    /// The partition's ownership generation when the record was made.
    generation: u32,
    acked: bool,
}

#[derive(Default)]
struct Model {
    owned: BTreeSet<i32>,
    /// Bumped on every revoke: work of an older generation is dead.
    generation: BTreeMap<i32, u32>,
    recs: BTreeMap<Tag, Rec>,
    in_flight: Vec<Tag>,
    pending_write: Option<BatchId>,
    written: BTreeSet<BatchId>,
    pending_commit: Option<BatchId>,
    committed: BTreeSet<BatchId>,
    /// Batches whose Write included each partition.
    writes: BTreeMap<BatchId, Vec<i32>>,
}

impl Model {
    fn live(&self, r: &Rec) -> bool {
        self.owned.contains(&r.partition)
            && self.generation.get(&r.partition).copied().unwrap_or(0) == r.generation
    }

    fn gen(&self, p: i32) -> u32 {
        self.generation.get(&p).copied().unwrap_or(0)
    }
}

fn perform(c: &mut Cycle, m: &mut Model, a: Action, refuse: bool) -> Result<(), TestCaseError> {
    match a {
        Action::Send(t) => {
            let r = m
                .recs
                .get(&t)
                .cloned()
                .expect("a tag the driver registered");
            // b: nothing leaves for a partition revoked since.
            prop_assert!(m.live(&r), "sent {t:?} of a revoked partition: {r:?}");
            if t.lane == Lane::Changelog {
                // d: every earlier group of the batch is acknowledged.
                for (ot, or) in &m.recs {
                    if ot.batch == t.batch
                        && ot.lane == Lane::Changelog
                        && or.group < r.group
                        && m.live(or)
                    {
                        prop_assert!(
                            or.acked,
                            "group {} sent before {ot:?} (group {}) was acked",
                            r.group,
                            or.group
                        );
                    }
                }
            }
            if t.lane == Lane::Changelog {
                // e: a changelog record leaves only after every live
                // output of its batch is acknowledged.
                for (ot, or) in &m.recs {
                    if ot.batch == t.batch && ot.lane == Lane::Outputs && m.live(or) {
                        prop_assert!(
                            or.acked,
                            "changelog group {} sent before output {ot:?} was acked",
                            r.group
                        );
                    }
                }
            }
            if refuse {
                c.refused(t);
            } else {
                c.sent(t);
                m.in_flight.push(t);
            }
        }
        Action::Write(id, parts) => {
            for p in &parts {
                prop_assert!(m.owned.contains(p), "write for unowned {p}");
            }
            // a: every record of the batch for the written partitions acked.
            for (t, r) in &m.recs {
                if t.batch == id && parts.contains(&r.partition) && m.live(r) {
                    prop_assert!(r.acked, "write of batch {id} before {t:?} was acked");
                }
            }
            prop_assert!(m.pending_write.is_none());
            m.pending_write = Some(id);
            m.writes.insert(id, parts);
        }
        Action::Commit(id, parts) => {
            prop_assert!(m.written.contains(&id), "commit before the write of {id}");
            for p in &parts {
                prop_assert!(m.owned.contains(p), "commit for unowned {p}");
            }
            m.pending_commit = Some(id);
        }
        Action::Durable(_) | Action::Forget(_) => {}
        Action::Purge => {
            // librdkafka reports every purged record as failed.
            for t in std::mem::take(&mut m.in_flight) {
                c.delivered(t, false);
            }
        }
    }
    Ok(())
}

fn deliver(c: &mut Cycle, m: &mut Model, i: usize, ok: bool) {
    if m.in_flight.is_empty() {
        return;
    }
    let t = m.in_flight.remove(i % m.in_flight.len());
    if ok {
        if let Some(r) = m.recs.get_mut(&t) {
            r.acked = true;
        }
    }
    c.delivered(t, ok);
}

fn step(c: &mut Cycle, m: &mut Model, op: Op) -> Result<(), TestCaseError> {
    match op {
        Op::Assign(p) => {
            c.assign(p);
            m.owned.insert(p);
        }
        Op::Revoke(p) => {
            c.revoke(&[p]);
            if m.owned.remove(&p) {
                *m.generation.entry(p).or_default() += 1;
            }
        }
        Op::Record(p, n) => {
            c.input(p);
            for _ in 0..n {
                let t = c.output(p);
                prop_assert_eq!(t.is_some(), m.owned.contains(&p));
                if let Some(t) = t {
                    let generation = m.gen(p);
                    m.recs.insert(
                        t,
                        Rec {
                            partition: p,
                            group: 0,
                            generation,
                            acked: false,
                        },
                    );
                }
            }
        }
        Op::Seal(rows) => {
            if let Ok(id) = c.seal(7, &rows) {
                for (i, (p, g)) in rows.iter().enumerate() {
                    let t = Tag {
                        batch: id,
                        lane: Lane::Changelog,
                        index: i as u32,
                    };
                    let generation = m.gen(*p);
                    // A row of a partition not owned is dead from the start.
                    let generation = if m.owned.contains(p) {
                        generation
                    } else {
                        u32::MAX
                    };
                    m.recs.insert(
                        t,
                        Rec {
                            partition: *p,
                            group: *g,
                            generation,
                            acked: false,
                        },
                    );
                }
            }
        }
        Op::Drive(n, refuse) => {
            for _ in 0..n {
                let Some(a) = c.poll_action() else { break };
                perform(c, m, a, refuse)?;
            }
        }
        Op::Deliver(i, ok) => deliver(c, m, i, ok),
        Op::Late(b, i) => {
            // A batch id far behind any live one.
            let t = Tag {
                batch: u32::MAX - b,
                lane: Lane::Outputs,
                index: i,
            };
            c.delivered(t, true);
        }
        Op::ResumeSending => c.resume_sending(),
        Op::StoreDone => {
            if let Some(id) = m.pending_write.take() {
                m.written.insert(id);
                c.written(id);
            }
        }
        Op::CommitDone => {
            if let Some(id) = m.pending_commit.take() {
                m.committed.insert(id);
                c.committed(id);
            }
        }
    }
    Ok(())
}

/// Faults gone: drive to quiescence, sealing what is collected.
fn settle(c: &mut Cycle, m: &mut Model) -> Result<(), TestCaseError> {
    c.resume_sending();
    for _ in 0..10_000 {
        let mut moved = false;
        while let Some(a) = c.poll_action() {
            perform(c, m, a, false)?;
            moved = true;
        }
        while !m.in_flight.is_empty() {
            deliver(c, m, 0, true);
            moved = true;
        }
        if m.pending_write.is_some() {
            step(c, m, Op::StoreDone)?;
            moved = true;
        }
        if m.pending_commit.is_some() {
            step(c, m, Op::CommitDone)?;
            moved = true;
        }
        if !moved {
            if c.phase() == Phase::Collecting && c.collected() > 0 {
                step(c, m, Op::Seal(vec![]))?;
                continue;
            }
            return Ok(());
        }
    }
    Err(TestCaseError::fail("the cycle did not settle"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn the_cycle_keeps_its_invariants(ops in prop::collection::vec(op(), 1..120)) {
        let mut c = Cycle::new();
        let mut m = Model::default();
        for op in ops {
            step(&mut c, &mut m, op)?;
        }
        settle(&mut c, &mut m)?;
        prop_assert_eq!(c.phase(), Phase::Collecting);
        // c: every output of a partition owned throughout is acknowledged,
        // and a batch that wrote it was committed.
        for (t, r) in &m.recs {
            if m.live(r) {
                prop_assert!(r.acked, "{:?} of a live partition never acknowledged", t);
                let wrote = m.writes.get(&t.batch).is_some_and(|ps| ps.contains(&r.partition));
                prop_assert!(wrote && m.committed.contains(&t.batch), "{:?}: its batch did not commit it", t);
            }
        }
    }
}
