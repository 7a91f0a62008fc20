//! The view's sessions in a local RocksDB ([`SessionShelf`]), so a pod
//! that serves ten million open sessions does not hold them in memory.
//!
//! The shelf is a cache of `revenue-windows`, which every pod reads from
//! the start at every start: it is created empty each time (the
//! directory is removed first), written without a write-ahead log and
//! never synced. A crash loses nothing the topic does not have. Keys are
//! customer ids; values the customer's sessions (postcard). A read or
//! write error is logged and counted (`tally_view_shelf_errors_total`):
//! the view then answers without that customer's sessions until the next
//! update of them, which is what a view still catching up does.

use std::path::Path;
use std::sync::Arc;

use prometheus::IntCounter;
use rocksdb::{BlockBasedOptions, Cache, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use tracing::error;

use tally_core::view::{SessionShelf, ShelvedSession};

#[derive(Debug, thiserror::Error)]
pub enum ShelfError {
    #[error("the view's session store in {dir}: {source}")]
    Rocks { dir: String, source: rocksdb::Error },
    #[error("the view's session store in {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

pub struct RocksShelf {
    db: Arc<DB>,
    errors: IntCounter,
}

/// RocksDB's memory for the shelf: small and fixed. The shelf's working
/// set is the customers being updated now (held by the view, see
/// [`HOT_CUSTOMERS`]); the rest stays on disk.
const SHELF_CACHE_BYTES: usize = 12 << 20;

/// Customers whose sessions the view holds in memory between write-backs
/// to the shelf (`View::set_session_shelf`). A customer's sessions take
/// about half a kilobyte to a kilobyte in memory, so this is 2–4 MiB,
/// taken from the block cache above (16 MiB before): the view's work is
/// decoding and encoding a customer's sessions on every update, which a
/// block cache does not save and this does.
pub const HOT_CUSTOMERS: usize = 4096;
const SHELF_WRITE_BUFFER_BYTES: usize = 8 << 20;

impl RocksShelf {
    /// Opens an empty shelf in `dir`, removing whatever a previous run left.
    pub fn open_fresh(dir: &Path, errors: IntCounter) -> Result<RocksShelf, ShelfError> {
        let name = dir.display().to_string();
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|source| ShelfError::Io {
                dir: name.clone(),
                source,
            })?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_write_buffer_size(SHELF_WRITE_BUFFER_BYTES);
        opts.set_max_write_buffer_number(2);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(SHELF_CACHE_BYTES));
        table.set_cache_index_and_filter_blocks(true);
        // Most updates are of a customer not seen yet: a bloom filter
        // answers those without a data block (partitioned, as the state
        // store's, so large files' filters fit the cache).
        table.set_bloom_filter(10.0, false);
        table.set_partition_filters(true);
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_pin_top_level_index_and_filter(true);
        opts.set_block_based_table_factory(&table);
        let db = DB::open(&opts, dir).map_err(|source| ShelfError::Rocks { dir: name, source })?;
        Ok(RocksShelf {
            db: Arc::new(db),
            errors,
        })
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) {
        self.errors.inc();
        error!(error = %e, "{what} in the view's session store failed");
    }
}

impl SessionShelf for RocksShelf {
    fn get(&self, customer: &str) -> Vec<ShelvedSession> {
        match self.db.get_pinned(customer.as_bytes()) {
            Ok(Some(v)) => match postcard::from_bytes(&v) {
                Ok(list) => list,
                Err(e) => {
                    self.failed("decoding", e);
                    Vec::new()
                }
            },
            Ok(None) => Vec::new(),
            Err(e) => {
                self.failed("a read", e);
                Vec::new()
            }
        }
    }

    fn put(&mut self, customer: &str, sessions: &[ShelvedSession]) {
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        let r = if sessions.is_empty() {
            self.db.delete_opt(customer.as_bytes(), &w)
        } else {
            match postcard::to_allocvec(sessions) {
                Ok(v) => self.db.put_opt(customer.as_bytes(), v, &w),
                Err(e) => return self.failed("encoding", e),
            }
        };
        if let Err(e) = r {
            self.failed("a write", e);
        }
    }

    fn put_many(&mut self, batch: &[(Arc<str>, Vec<ShelvedSession>)]) {
        let mut b = WriteBatch::default();
        for (customer, sessions) in batch {
            if sessions.is_empty() {
                b.delete(customer.as_bytes());
            } else {
                match postcard::to_allocvec(sessions) {
                    Ok(v) => b.put(customer.as_bytes(), v),
                    Err(e) => self.failed("encoding", e),
                }
            }
        }
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        if let Err(e) = self.db.write_opt(b, &w) {
            self.failed("a write", e);
        }
    }

    fn scan(&self, f: &mut dyn FnMut(&str, Vec<ShelvedSession>) -> bool) {
        for item in self.db.iterator(IteratorMode::Start) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return self.failed("a scan", e),
            };
            let (Ok(customer), Ok(list)) = (
                std::str::from_utf8(&k),
                postcard::from_bytes::<Vec<ShelvedSession>>(&v),
            ) else {
                self.failed("decoding", "a row that is not a customer's sessions");
                continue;
            };
            if !f(customer, list) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::aggregate::PartialAgg;

    #[test]
    fn a_fresh_shelf_is_empty_and_keeps_what_is_put() {
        let dir = std::env::temp_dir().join(format!("tally-shelf-{}", std::process::id()));
        let counter = IntCounter::new("t", "t").unwrap();
        let s = |start| ShelvedSession {
            spec: "s".into(),
            start,
            end: start + 5,
            partials: vec![(3, true, 2, PartialAgg::default())],
        };
        {
            let mut shelf = RocksShelf::open_fresh(&dir, counter.clone()).unwrap();
            shelf.put("c1", &[s(1), s(9)]);
            shelf.put("c2", &[s(4)]);
            assert_eq!(shelf.get("c1"), vec![s(1), s(9)]);
            shelf.put("c2", &[]);
            assert!(shelf.get("c2").is_empty());
            let mut seen = Vec::new();
            shelf.scan(&mut |c, l| {
                seen.push((c.to_string(), l.len()));
                true
            });
            assert_eq!(seen, vec![("c1".to_string(), 2)]);
            // A batch puts and removes as single puts do.
            shelf.put_many(&[("c1".into(), vec![]), ("c3".into(), vec![s(2)])]);
            assert!(shelf.get("c1").is_empty());
            assert_eq!(shelf.get("c3"), vec![s(2)]);
        }
        let shelf = RocksShelf::open_fresh(&dir, counter.clone()).unwrap();
        assert!(shelf.get("c1").is_empty(), "a new run starts empty");
        assert_eq!(counter.get(), 0);
        drop(shelf);
        let _ = std::fs::remove_dir_all(dir);
    }
}
