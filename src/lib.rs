//! tally: a Kafka-native stream processor that turns order events into live,
//! exact revenue figures.
//!
//! - [`core`]: the pure state machine (no IO, no clock). Everything about
//!   windows, watermarks, sessions, dedup and aggregates lives there.
//! - [`config`]: the one configuration struct (flags, `TALLY_*` env, TOML).
//! - [`pod`]: the consumer pod, the poll loop around the core.
//! - [`store`]: RocksDB state (rows, offsets, watermarks).
//! - [`output`]: effects to Kafka records (the output wire formats).
//! - [`fx`]: the `fx-rates` table adapter.
//! - [`topics`]: topic declarations and applying them.
//! - [`gen`]: the load generator with ground truth.
//! - [`broker`]: the embedded (mock) broker.
//! - [`http`]: the HTTP adapter (axum): revenue, windows, sessions, webhook, metrics, health, live page.
//! - [`serving`]: feeds the view from `revenue-windows`.
//! - [`bench`]: measured scenarios (`tally bench`).
//! - [`metrics`]: Prometheus metrics.
//! - [`replay`]: the batch layer (`tally replay`).
//! - [`view`]: the global serving view (pure), fed from `revenue-windows`.

pub mod bench;
pub mod broker;
pub mod config;
pub mod core;
pub mod fx;
pub mod gen;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod pod;
pub mod replay;
pub mod serving;
pub mod store;
pub mod topics;
pub mod view;
