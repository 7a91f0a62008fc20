//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod churn;
pub mod kafka;
pub mod manifests;
pub mod procs;
