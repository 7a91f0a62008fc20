//! The pod's flush cycle and partition ownership, as a sans-IO state
//! machine: inputs in (records registered, a seal, delivery reports, store
//! and commit results, assign, revoke), [`Action`]s out. The pod is a thin
//! driver that performs the actions and reports their results; it keeps
//! the records' bytes, this keeps their fate.
//!
//! A flush is one [`Batch`] through named [`Phase`]s:
//! `Collecting → OutputsInFlight → ChangelogInFlight(g) → Writing →
//! Committing → Collecting`. Outputs are offered to the producer as they
//! are made (the batch being collected), so the flush mostly waits for
//! the last acks.
//!
//! Invariants (model-based property tests in `tests/cycle_model.rs`):
//! - **a** nothing is written to the store or committed before every
//!   output and changelog record of the batch, for the partitions written,
//!   is acknowledged;
//! - **b** once a partition is revoked, nothing more is sent, written or
//!   committed for it; its pending work is dropped, and the producer's
//!   queue is purged when anything was in flight;
//! - **c** every registered output of a partition still owned is
//!   acknowledged in the end (a failed one is sent again), or its
//!   partition was revoked and its input is processed again by the next
//!   owner from the last durable offset; nothing is dropped silently;
//! - **d** a batch's changelog records are sent group by group
//!   ([`crate::StateChange::group`]): no record of group `g + 1` leaves
//!   before all of group `g` is acknowledged, so what a crash leaves in
//!   the changelog is whole groups plus a subset of the next;
//! - **e** no changelog record leaves before every output of its batch
//!   is acknowledged: a row that says its records were applied never
//!   lands before their outputs.
//!
//! Each record is named by a [`Tag`] (batch, lane, index), carried through
//! the producer as the delivery opaque, so a late report of a batch that is
//! gone is recognised and ignored, never credited to another batch.

use std::collections::{BTreeSet, VecDeque};

use crate::engine::{FlushId, Partition, CHANGE_GROUPS};

pub type BatchId = u32;

/// Which of a batch's record sequences a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    Outputs,
    Changelog,
}

/// One record's name across the producer boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    pub batch: BatchId,
    pub lane: Lane,
    pub index: u32,
}

// The opaque packs a tag into 64 bits.
const _: () = assert!(usize::BITS == 64, "tally needs a 64-bit target");
const LANE_BIT: usize = 1 << 31;

impl Tag {
    /// The producer's delivery opaque: batch in the high 32 bits, the lane
    /// in bit 31, the index below.
    pub fn to_opaque(self) -> usize {
        let lane = match self.lane {
            Lane::Outputs => 0,
            Lane::Changelog => LANE_BIT,
        };
        ((self.batch as usize) << 32) | lane | (self.index as usize & (LANE_BIT - 1))
    }

    pub fn from_opaque(o: usize) -> Tag {
        Tag {
            batch: (o >> 32) as BatchId,
            lane: if o & LANE_BIT != 0 {
                Lane::Changelog
            } else {
                Lane::Outputs
            },
            index: (o & (LANE_BIT - 1)) as u32,
        }
    }
}

/// Where a batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No batch sealed: records are collected, their outputs sent as made.
    Collecting,
    /// Sealed: waiting for every output's acknowledgement.
    OutputsInFlight,
    /// Outputs acknowledged; changelog group `g` in flight.
    ChangelogInFlight(usize),
    /// Everything acknowledged; the store write was asked for.
    Writing,
    /// The store holds the batch; the commit was asked for.
    Committing,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Offer this record to the producer; report [`Cycle::sent`] or
    /// [`Cycle::refused`].
    Send(Tag),
    /// Write the batch's state rows and offsets for these partitions (and
    /// no other) in one durable store batch; report [`Cycle::written`].
    Write(BatchId, Vec<Partition>),
    /// Commit the offsets of these partitions; report [`Cycle::committed`].
    Commit(BatchId, Vec<Partition>),
    /// The engine may purge what this flush made durable.
    Durable(FlushId),
    /// Drop every record queued in the producer; the purged ones come back
    /// as failed delivery reports.
    Purge,
    /// The batch is done (or abandoned): its records' bytes can go.
    Forget(BatchId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    /// Not yet taken by the producer (or refused: its queue was full).
    Pending,
    InFlight,
    Acked,
    Failed,
    /// Its partition was revoked: it is never sent again and waits for
    /// nothing, even if the partition comes back.
    Dropped,
}

#[derive(Clone, Debug)]
struct Slot {
    partition: Partition,
    group: usize,
    state: Delivery,
}

/// A flush's records and their delivery states.
#[derive(Clone, Debug)]
pub struct Batch {
    id: BatchId,
    outputs: Vec<Slot>,
    changelog: Vec<Slot>,
    flush: Option<FlushId>,
    /// Input partitions with records in this batch (their offsets commit).
    partitions: BTreeSet<Partition>,
}

impl Batch {
    fn new(id: BatchId) -> Batch {
        Batch {
            id,
            outputs: Vec::new(),
            changelog: Vec::new(),
            flush: None,
            partitions: BTreeSet::new(),
        }
    }

    fn slot_mut(&mut self, lane: Lane, index: u32) -> Option<&mut Slot> {
        match lane {
            Lane::Outputs => self.outputs.get_mut(index as usize),
            Lane::Changelog => self.changelog.get_mut(index as usize),
        }
    }
}

/// Why an input was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CycleError {
    /// A batch is already sealed and not yet committed.
    Busy,
}

/// The flush cycle of one pod.
#[derive(Clone, Debug)]
pub struct Cycle {
    owned: BTreeSet<Partition>,
    next_id: BatchId,
    collecting: Batch,
    sealed: Option<Batch>,
    phase: Phase,
    actions: VecDeque<Action>,
    /// Delivery reports for records of no current batch (ignored).
    pub late_reports: u64,
    /// The producer refused a record (queue full): sending waits for
    /// [`Cycle::resume_sending`].
    blocked: bool,
    /// In the sealed batch's current phase, every slot before this index
    /// is done (acknowledged or dropped; both are final), so `advance`
    /// resumes there. Why: `advance` runs on every acknowledgement, and
    /// checking the whole lane each time made a flush of n records cost
    /// n²/2 checks (a profile of a restore: 55 % of the process in
    /// `Cycle::advance`).
    cursor: usize,
}

impl Default for Cycle {
    fn default() -> Self {
        Cycle::new()
    }
}

impl Cycle {
    pub fn new() -> Cycle {
        Cycle {
            owned: BTreeSet::new(),
            next_id: 1,
            collecting: Batch::new(0),
            sealed: None,
            phase: Phase::Collecting,
            actions: VecDeque::new(),
            late_reports: 0,
            blocked: false,
            cursor: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn owned(&self) -> impl Iterator<Item = Partition> + '_ {
        self.owned.iter().copied()
    }

    /// The batch being collected (its outputs are registered here).
    pub fn collecting(&self) -> BatchId {
        self.collecting.id
    }

    /// The batch sealed and in flight, if any.
    pub fn sealed(&self) -> Option<BatchId> {
        self.sealed.as_ref().map(|b| b.id)
    }

    /// Records of the collecting batch so far.
    pub fn collected(&self) -> usize {
        self.collecting.outputs.len()
    }

    pub fn assign(&mut self, p: Partition) {
        self.owned.insert(p);
    }

    /// An input record of `p` was folded into the collecting batch (its
    /// offset will be committed with it).
    pub fn input(&mut self, p: Partition) {
        if self.owned.contains(&p) {
            self.collecting.partitions.insert(p);
        }
    }

    /// Registers an output made from a record of partition `p`; the driver
    /// keeps its bytes under the returned tag. `None` for a partition not
    /// owned: the output must not leave.
    pub fn output(&mut self, p: Partition) -> Option<Tag> {
        if !self.owned.contains(&p) {
            return None;
        }
        let b = &mut self.collecting;
        let tag = Tag {
            batch: b.id,
            lane: Lane::Outputs,
            index: b.outputs.len() as u32,
        };
        b.outputs.push(Slot {
            partition: p,
            group: 0,
            state: Delivery::Pending,
        });
        b.partitions.insert(p);
        if !self.blocked {
            self.actions.push_back(Action::Send(tag));
        }
        Some(tag)
    }

    /// Seals the collecting batch as flush `flush`, with its changelog
    /// records: `(partition, group)` each, in the driver's order (the tags
    /// are `Changelog` 0, 1, …). A new batch starts collecting.
    pub fn seal(
        &mut self,
        flush: FlushId,
        changelog: &[(Partition, usize)],
    ) -> Result<BatchId, CycleError> {
        if self.sealed.is_some() {
            return Err(CycleError::Busy);
        }
        let next = Batch::new(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let mut b = std::mem::replace(&mut self.collecting, next);
        b.flush = Some(flush);
        for (p, g) in changelog {
            let owned = self.owned.contains(p);
            if owned {
                b.partitions.insert(*p);
            }
            b.changelog.push(Slot {
                partition: *p,
                group: (*g).min(CHANGE_GROUPS - 1),
                // A row of a partition not owned never leaves.
                state: if owned {
                    Delivery::Pending
                } else {
                    Delivery::Dropped
                },
            });
        }
        let id = b.id;
        self.sealed = Some(b);
        self.phase = Phase::OutputsInFlight;
        self.cursor = 0;
        // Outputs refused or failed while collecting are offered again.
        self.resend(Lane::Outputs, None);
        self.advance();
        Ok(id)
    }

    /// The producer took the record.
    pub fn sent(&mut self, tag: Tag) {
        if let Some(s) = self.slot_mut(tag) {
            if s.state == Delivery::Pending || s.state == Delivery::Failed {
                s.state = Delivery::InFlight;
            }
        }
    }

    /// The producer refused the record (its queue is full): it is offered
    /// again after [`Cycle::resume_sending`]. The driver stops sending
    /// until then, so the other queued sends are dropped here.
    pub fn refused(&mut self, tag: Tag) {
        if let Some(s) = self.slot_mut(tag) {
            s.state = Delivery::Pending;
        }
        self.blocked = true;
        self.actions.retain(|a| !matches!(a, Action::Send(_)));
    }

    /// The producer has room again (after a poll): what waits is offered.
    pub fn resume_sending(&mut self) {
        if !self.blocked {
            return;
        }
        self.blocked = false;
        let collecting = self.collecting.id;
        self.resend_batch(collecting, Lane::Outputs, None);
        match self.phase {
            Phase::OutputsInFlight => self.resend(Lane::Outputs, None),
            Phase::ChangelogInFlight(g) => self.resend(Lane::Changelog, Some(g)),
            _ => {}
        }
    }

    /// A delivery report. A report for a record of no current batch, or of
    /// a partition no longer owned, changes nothing.
    pub fn delivered(&mut self, tag: Tag, ok: bool) {
        let batch = if self.collecting.id == tag.batch {
            Some(&mut self.collecting)
        } else {
            self.sealed.as_mut().filter(|b| b.id == tag.batch)
        };
        let Some(slot) = batch.and_then(|b| b.slot_mut(tag.lane, tag.index)) else {
            self.late_reports += 1;
            return;
        };
        if slot.state != Delivery::InFlight {
            self.late_reports += 1;
            return;
        }
        slot.state = if ok {
            Delivery::Acked
        } else {
            Delivery::Failed
        };
        if !ok && !self.blocked {
            // Sent again now for outputs; changelog records only within
            // their group's turn (advance decides).
            let resend =
                tag.lane == Lane::Outputs || self.phase == Phase::ChangelogInFlight(slot.group);
            if resend {
                self.actions.push_back(Action::Send(tag));
            }
        }
        self.advance();
    }

    /// The store write of batch `id` is durable.
    pub fn written(&mut self, id: BatchId) {
        if self.phase != Phase::Writing || self.sealed() != Some(id) {
            return;
        }
        let parts = self.commit_set();
        self.phase = Phase::Committing;
        self.actions.push_back(Action::Commit(id, parts));
    }

    /// The commit of batch `id` is done (or failed: the store's offsets
    /// win on the next assignment, so a failed commit is not retried here).
    pub fn committed(&mut self, id: BatchId) {
        if self.phase != Phase::Committing || self.sealed() != Some(id) {
            return;
        }
        let b = self.sealed.take().expect("a sealed batch while committing");
        if let Some(f) = b.flush {
            self.actions.push_back(Action::Durable(f));
        }
        self.actions.push_back(Action::Forget(b.id));
        self.phase = Phase::Collecting;
    }

    /// Partitions taken away. Their pending work is dropped: nothing more
    /// is sent, written or committed for them, and if any of their records
    /// were in the producer, its queue is purged (the records of partitions
    /// still owned come back as failures and are sent again).
    pub fn revoke(&mut self, partitions: &[Partition]) {
        let gone: BTreeSet<Partition> = partitions
            .iter()
            .copied()
            .filter(|p| self.owned.remove(p))
            .collect();
        if gone.is_empty() {
            return;
        }
        let in_producer = |b: &Batch| {
            b.outputs
                .iter()
                .chain(&b.changelog)
                .any(|s| gone.contains(&s.partition) && s.state == Delivery::InFlight)
        };
        let purge = in_producer(&self.collecting) || self.sealed.as_ref().is_some_and(in_producer);
        // Queued sends of their records are withdrawn.
        let (collecting, sealed) = (&self.collecting, &self.sealed);
        self.actions.retain(|a| match a {
            Action::Send(t) => {
                let b = if t.batch == collecting.id {
                    Some(collecting)
                } else {
                    sealed.as_ref().filter(|b| b.id == t.batch)
                };
                let slot = b.and_then(|b| match t.lane {
                    Lane::Outputs => b.outputs.get(t.index as usize),
                    Lane::Changelog => b.changelog.get(t.index as usize),
                });
                slot.is_some_and(|s| !gone.contains(&s.partition))
            }
            _ => true,
        });
        // A queued write or commit leaves them out.
        for a in self.actions.iter_mut() {
            if let Action::Write(_, ps) | Action::Commit(_, ps) = a {
                ps.retain(|p| !gone.contains(p));
            }
        }
        for b in std::iter::once(&mut self.collecting).chain(self.sealed.as_mut()) {
            for p in &gone {
                b.partitions.remove(p);
            }
            for s in b.outputs.iter_mut().chain(b.changelog.iter_mut()) {
                if gone.contains(&s.partition) {
                    s.state = Delivery::Dropped;
                }
            }
        }
        if purge {
            self.actions.push_back(Action::Purge);
        }
        // What no longer waits for them may move on.
        self.advance();
    }

    /// The next action, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next action, left in place.
    pub fn peek_action(&self) -> Option<&Action> {
        self.actions.front()
    }

    fn slot_mut(&mut self, tag: Tag) -> Option<&mut Slot> {
        if self.collecting.id == tag.batch {
            return self.collecting.slot_mut(tag.lane, tag.index);
        }
        self.sealed
            .as_mut()
            .filter(|b| b.id == tag.batch)
            .and_then(|b| b.slot_mut(tag.lane, tag.index))
    }

    /// Partitions whose rows and offsets the sealed batch writes: those it
    /// touched that are still owned.
    fn commit_set(&self) -> Vec<Partition> {
        self.sealed
            .as_ref()
            .map(|b| b.partitions.intersection(&self.owned).copied().collect())
            .unwrap_or_default()
    }

    /// Offers again the pending and failed records of the sealed batch's
    /// `lane` (of group `group` only, for the changelog).
    fn resend(&mut self, lane: Lane, group: Option<usize>) {
        if let Some(id) = self.sealed() {
            self.resend_batch(id, lane, group);
        }
    }

    fn resend_batch(&mut self, id: BatchId, lane: Lane, group: Option<usize>) {
        if self.blocked {
            return;
        }
        let b = if self.collecting.id == id {
            &self.collecting
        } else {
            match self.sealed.as_ref().filter(|b| b.id == id) {
                Some(b) => b,
                None => return,
            }
        };
        let slots = match lane {
            Lane::Outputs => &b.outputs,
            Lane::Changelog => &b.changelog,
        };
        let queued: BTreeSet<Tag> = self
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(t) => Some(*t),
                _ => None,
            })
            .collect();
        let todo: Vec<Tag> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                matches!(s.state, Delivery::Pending | Delivery::Failed)
                    && group.is_none_or(|g| s.group == g)
            })
            .map(|(i, _)| Tag {
                batch: id,
                lane,
                index: i as u32,
            })
            .filter(|t| !queued.contains(t))
            .collect();
        self.actions.extend(todo.into_iter().map(Action::Send));
    }

    /// Moves the sealed batch as far as its acknowledgements allow.
    fn advance(&mut self) {
        loop {
            let Some(b) = self.sealed.as_ref() else {
                return;
            };
            let done = |s: &Slot| matches!(s.state, Delivery::Acked | Delivery::Dropped);
            match self.phase {
                Phase::OutputsInFlight => {
                    let rest = b.outputs.get(self.cursor..).unwrap_or_default();
                    self.cursor += rest.iter().take_while(|s| done(s)).count();
                    if self.cursor < b.outputs.len() {
                        return;
                    }
                    self.phase = Phase::ChangelogInFlight(0);
                    self.cursor = 0;
                    self.resend(Lane::Changelog, Some(0));
                }
                Phase::ChangelogInFlight(g) => {
                    let rest = b.changelog.get(self.cursor..).unwrap_or_default();
                    self.cursor += rest.iter().take_while(|s| s.group != g || done(s)).count();
                    if self.cursor < b.changelog.len() {
                        return;
                    }
                    self.cursor = 0;
                    if g + 1 < CHANGE_GROUPS {
                        self.phase = Phase::ChangelogInFlight(g + 1);
                        self.resend(Lane::Changelog, Some(g + 1));
                    } else {
                        let parts = self.commit_set();
                        let id = b.id;
                        self.phase = Phase::Writing;
                        self.actions.push_back(Action::Write(id, parts));
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(c: &mut Cycle) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    #[test]
    fn a_tag_survives_the_opaque() {
        for t in [
            Tag {
                batch: 7,
                lane: Lane::Changelog,
                index: 12_345,
            },
            Tag {
                batch: u32::MAX,
                lane: Lane::Outputs,
                index: (1 << 31) - 1,
            },
        ] {
            assert_eq!(Tag::from_opaque(t.to_opaque()), t);
        }
    }

    #[test]
    fn a_batch_goes_through_its_phases_in_order() {
        let mut c = Cycle::new();
        c.assign(0);
        c.input(0);
        let out = c.output(0).unwrap();
        assert_eq!(drain(&mut c), vec![Action::Send(out)]);
        c.sent(out);
        let id = c.seal(1, &[(0, 1), (0, 3)]).unwrap();
        assert_eq!(c.phase(), Phase::OutputsInFlight);
        assert!(drain(&mut c).is_empty(), "nothing before the outputs' ack");
        c.delivered(out, true);
        let row = Tag {
            batch: id,
            lane: Lane::Changelog,
            index: 0,
        };
        let meta = Tag { index: 1, ..row };
        assert_eq!(drain(&mut c), vec![Action::Send(row)]);
        c.sent(row);
        c.delivered(row, true);
        assert_eq!(drain(&mut c), vec![Action::Send(meta)], "meta comes last");
        c.sent(meta);
        c.delivered(meta, true);
        assert_eq!(drain(&mut c), vec![Action::Write(id, vec![0])]);
        c.written(id);
        assert_eq!(drain(&mut c), vec![Action::Commit(id, vec![0])]);
        c.committed(id);
        assert_eq!(drain(&mut c), vec![Action::Durable(1), Action::Forget(id)]);
        assert_eq!(c.phase(), Phase::Collecting);
    }

    #[test]
    fn a_report_of_a_batch_that_is_gone_is_ignored() {
        let mut c = Cycle::new();
        c.assign(0);
        let t = c.output(0).unwrap();
        c.sent(t);
        c.delivered(t, true);
        let id = c.seal(1, &[]).unwrap();
        drain(&mut c);
        c.written(id);
        c.committed(id);
        drain(&mut c);
        // The next batch's first output has the same index, another batch.
        let t2 = c.output(0).unwrap();
        assert_eq!(t2.index, t.index);
        c.sent(t2);
        c.delivered(t, true);
        assert_eq!(c.late_reports, 1);
        let id2 = c.seal(2, &[]).unwrap();
        assert!(
            !drain(&mut c).iter().any(|a| matches!(a, Action::Write(..))),
            "{id2}: the old report must not acknowledge the new output"
        );
    }

    #[test]
    fn a_revoke_drops_the_partitions_work_and_purges() {
        let mut c = Cycle::new();
        c.assign(0);
        c.assign(1);
        let a = c.output(0).unwrap();
        let b = c.output(1).unwrap();
        c.sent(a);
        c.sent(b);
        let id = c.seal(1, &[(0, 3), (1, 3)]).unwrap();
        drain(&mut c);
        c.revoke(&[1]);
        assert_eq!(drain(&mut c), vec![Action::Purge]);
        // The purge fails what was queued; only partition 0's is resent.
        c.delivered(a, false);
        c.delivered(b, false);
        assert_eq!(drain(&mut c), vec![Action::Send(a)]);
        c.sent(a);
        c.delivered(a, true);
        let meta0 = Tag {
            batch: id,
            lane: Lane::Changelog,
            index: 0,
        };
        assert_eq!(drain(&mut c), vec![Action::Send(meta0)]);
        c.sent(meta0);
        c.delivered(meta0, true);
        assert_eq!(drain(&mut c), vec![Action::Write(id, vec![0])]);
    }
}
