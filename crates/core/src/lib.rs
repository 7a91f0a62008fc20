//! The pure core: validation, enrichment, windows, watermarks, sessions,
//! dedup and aggregates, as a state machine.
//!
//! **Architecture invariant:** this module does no IO, reads no clock and
//! knows nothing of Kafka, RocksDB, HTTP or metrics. Time enters only as
//! values (`wall_ms` arguments); effects leave only as values ([`Effect`],
//! [`StateChange`]). `tests/purity.rs` fails the build's tests if a file
//! here imports tokio, rdkafka, rocksdb, axum or prometheus, or touches the
//! clock, the file system, the network, threads or the environment.
//!
//! - [`order`]: bytes → validated, enriched order, or a rejection with a reason.
//! - [`window`]: window definitions and the tumbling/sliding assigners.
//! - [`aggregate`]: the mergeable per-window aggregate.
//! - [`sketch`]: the mergeable p95 sketch, with its error bound.
//! - [`cycle`]: the pod's flush cycle and partition ownership, as a sans-IO
//!   state machine (inputs in, actions out).
//! - [`engine`]: the per-partition state machine (watermarks, closing,
//!   sessions, dedup, per-row offsets, the flush/durable protocol).
//! - [`vecs`]: small-vector helpers (a leaf: no module cycle through it).
//! - [`view`]: the serving view's rules: merging partials from every input
//!   partition, when a merged window is final, and the queries.

pub mod aggregate;
pub mod cycle;
pub mod engine;
pub mod order;
pub mod sketch;
pub mod vecs;
pub mod view;
pub mod window;

pub use aggregate::{customer_hash, usd, Aggregate, PartialAgg};
pub use engine::{
    window_id, CacheStats, ConfigError, CoreConfig, DedupRow, DedupSegment, Effect, Engine,
    FlushId, InMemory, Offset, Partition, PartitionMeta, PartitionStatus, Readable, RowCacheStats,
    RowKey, Session, SessionSet, StateChange, StateReader, StateRow, WindowKey, WindowRow,
    WindowUpdate, CHANGE_GROUPS,
};
pub use order::{
    enrich, parse_order, parse_order_fields, parse_time, validate, Currency, EnrichedOrder,
    FieldSpan, FxTable, FxUpdate, Limits, Order, Rate, Reason, Rejection, FROM_START,
};
pub use window::{GroupBy, WindowKind, WindowSpec};
