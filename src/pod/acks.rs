//! Delivery reports: which of a flush's records the producer has
//! acknowledged, by lane and index.

use super::*;

pub(super) const PENDING: u8 = 0;

pub(super) const IN_FLIGHT: u8 = 1;

pub(super) const ACKED: u8 = 2;

pub(super) const FAILED: u8 = 3;

/// Which of a flush's two record sequences a delivery report belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    /// The batch's outputs, sent as they are made.
    Outputs = 0,
    /// The batch's changelog rows, sent once every output is acknowledged.
    Changelog = 1,
}

/// The top bit of a delivery opaque names the lane; the rest is the index.
pub(super) const LANE_BIT: usize = 1 << (usize::BITS - 1);

impl Lane {
    pub(super) fn opaque(self, index: usize) -> usize {
        match self {
            Lane::Outputs => index,
            Lane::Changelog => index | LANE_BIT,
        }
    }

    pub(super) fn of(opaque: usize) -> (Lane, usize) {
        if opaque & LANE_BIT != 0 {
            (Lane::Changelog, opaque & !LANE_BIT)
        } else {
            (Lane::Outputs, opaque)
        }
    }
}

/// The delivery state of one lane. The counters let the flush wait for
/// "everything acknowledged" without scanning tens of thousands of
/// statuses on every 1 ms poll.
#[derive(Default)]
pub(super) struct Acks {
    pub(super) status: Vec<u8>,
    pub(super) acked: usize,
    pub(super) failed: usize,
}

impl Acks {
    pub(super) fn reset(&mut self, len: usize) {
        self.status.clear();
        self.status.resize(len, PENDING);
        self.acked = 0;
        self.failed = 0;
    }
}

/// Records delivery results by lane and index into the current flush's records.
pub struct AckContext {
    pub(super) lanes: [Mutex<Acks>; 2],
    pub(super) changelog_topic: String,
    /// Highest acknowledged changelog offset per partition, this flush.
    pub(super) changelog_max: Mutex<HashMap<Partition, i64>>,
}

impl AckContext {
    pub(super) fn lane(&self, lane: Lane) -> MutexGuard<'_, Acks> {
        self.lanes[lane as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let ok = result.is_ok();
        match result {
            Err((e, _)) => warn!(error = %e, "an output was not delivered; it will be sent again"),
            Ok(m) if m.topic() == self.changelog_topic => {
                if let Ok(mut max) = self.changelog_max.lock() {
                    let e = max.entry(m.partition()).or_insert(m.offset());
                    *e = (*e).max(m.offset());
                }
            }
            Ok(_) => {}
        }
        let (lane, index) = Lane::of(opaque);
        let mut acks = self.lane(lane);
        if let Some(slot) = acks.status.get_mut(index) {
            // Only a record in flight can be acknowledged; anything else is a
            // report from a batch that was abandoned.
            if *slot == IN_FLIGHT {
                *slot = if ok { ACKED } else { FAILED };
                if ok {
                    acks.acked += 1;
                } else {
                    acks.failed += 1;
                }
            }
        }
    }
}
