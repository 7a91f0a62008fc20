//! What the engine hands the shell: window results and the other effects,
//! and a partition's observable progress.

use super::*;

/// A window's current result.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowUpdate {
    pub partition: Partition,
    pub spec_name: String,
    pub kind: WindowKind,
    pub by: GroupBy,
    pub key: WindowKey,
    pub row: WindowRow,
}

impl WindowUpdate {
    pub fn is_final(&self) -> bool {
        self.row.closed
    }

    /// A deterministic id, the same on every pod: `spec|group|start`.
    pub fn window_id(&self) -> String {
        window_id(&self.spec_name, &self.key)
    }
}

/// `spec|group|start`: the id of a window across partitions.
pub fn window_id(spec_name: &str, key: &WindowKey) -> String {
    format!("{}|{}|{}", spec_name, key.group, key.start)
}

/// What the shell must do. Effects of one record come out in the order the
/// record caused them; window updates of open windows come out at flush.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// A valid order folded into at least one window (→ `enriched-orders`).
    /// `late_windows` counts the window definitions for which it came too late.
    Accepted {
        partition: Partition,
        offset: Offset,
        order: EnrichedOrder,
        alert: bool,
        late_windows: u16,
    },
    /// A valid order whose windows had all closed (→ late policy).
    Late {
        partition: Partition,
        offset: Offset,
        order: EnrichedOrder,
        alert: bool,
    },
    /// Input that cannot be used (→ `orders-dlq`).
    Rejected {
        partition: Partition,
        offset: Offset,
        rejection: Rejection,
    },
    /// A second order with an `order_id` seen within the horizon; not counted.
    Duplicate {
        partition: Partition,
        offset: Offset,
        order_id: String,
    },
    /// A window's result; `row.closed` is the final flag.
    Window(WindowUpdate),
    /// A session superseded by a merge or an earlier event: its id must be
    /// tombstoned downstream.
    Retracted {
        partition: Partition,
        spec_name: String,
        key: WindowKey,
    },
    /// A closed window or session past its retention: its partial must be
    /// tombstoned downstream (once; idempotent if repeated after a crash).
    Expired {
        partition: Partition,
        spec_name: String,
        key: WindowKey,
    },
}

/// Observable progress of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionStatus {
    pub next_offset: Offset,
    pub watermark: Option<i64>,
    pub idle: bool,
}
