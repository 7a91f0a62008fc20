//! tally: a Kafka-native stream processor that turns order events into live,
//! exact revenue figures.
//!
//! - [`core`]: the pure state machine (no IO, no clock). Everything about
//!   windows, watermarks, sessions, dedup and aggregates lives there.

pub mod core;
