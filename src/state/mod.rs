//! The pod's local state: RocksDB ([`store`]) and the versioned encoding of
//! every stored value and changelog record ([`codec`]).

pub mod codec;
pub mod store;

pub use store::{Store, StoreError};
