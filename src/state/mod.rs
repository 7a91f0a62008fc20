//! The pod's local state: RocksDB ([`store`]), the versioned encoding of
//! every stored value and changelog record ([`codec`]), and the lock that
//! gives a state directory to one process ([`lock`]).

pub mod codec;
pub mod lock;
pub mod store;

pub use store::{Store, StoreError};
