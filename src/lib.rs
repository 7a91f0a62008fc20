//! tally: a Kafka-native stream processor that turns order events into live,
//! exact revenue figures. This is the effectful shell around the pure core
//! ([`tally_core`]).
//!
//! - [`config`]: the one configuration struct (flags, `TALLY_*` env, TOML).
//! - [`pod`]: the consumer pod: the poll loop around the core, flush,
//!   restore and rebalance.
//! - [`state`]: RocksDB state and its versioned codec.
//! - [`wire`]: the format of every topic the job writes, `revenue-windows`
//!   included.
//! - [`kafka`]: the one Kafka client factory, topic declarations, the
//!   embedded broker.
//! - [`fx`]: the `fx-rates` table adapter.
//! - [`serve`]: the view follower and the HTTP adapter.
//! - [`telemetry`]: logs, Prometheus metrics, the memory budget.
//! - [`gen`]: the load generator with ground truth.
//! - [`replay`]: the batch layer (`tally replay`).
//!
//! Benchmarks live in `crates/bench` (`tally-bench`), not here.

pub mod config;
pub mod fx;
pub mod gen;
pub mod kafka;
pub mod pod;
pub mod replay;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod wire;
