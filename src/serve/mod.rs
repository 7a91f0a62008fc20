//! Serving: every pod answers for the whole group.
//!
//! - [`follower`]: follows `revenue-windows` into the core's view and says
//!   when it has read to the end.
//! - [`shelf`]: the view's sessions in a local RocksDB, so they need not
//!   all be in memory.
//! - [`http`]: the axum routes, the JSON errors, the webhook, OpenAPI and
//!   the live page (`page.html`, compiled in).
//!
//! The merge and final rules are the core's (`tally_core::view`); the
//! record format is `wire::windows`.

pub mod follower;
pub mod http;
pub mod shelf;
