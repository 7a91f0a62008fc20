//! The RocksDB state store: partition rows and partition meta (offsets and
//! watermarks), written together in one synced `WriteBatch` per flush.
//!
//! Keys are `b's' ++ partition (i32, big-endian) ++ postcard(RowKey)`, so a
//! partition's rows are one contiguous prefix. Values are postcard-encoded
//! [`StateRow`]s. The key `b'f'` holds the fingerprint of the window
//! definitions the rows were written under; opening a store written under
//! another fingerprint is refused rather than silently mixing meanings.

use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::core::{Partition, RowKey, StateChange, StateRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("state encoding: {0}")]
    Encoding(#[from] postcard::Error),
    #[error(
        "the state in {dir} was written under other window definitions \
         (fingerprint {found:016x}, expected {expected:016x}); move it away or \
         recompute it with `tally replay` before starting with the new definitions"
    )]
    Fingerprint {
        dir: String,
        found: u64,
        expected: u64,
    },
}

const FINGERPRINT_KEY: &[u8] = b"f";
const ROW_PREFIX: u8 = b's';

pub struct Store {
    db: DB,
}

fn partition_prefix(p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [ROW_PREFIX, b[0], b[1], b[2], b[3]]
}

fn row_key(p: Partition, key: &RowKey) -> Result<Vec<u8>, StoreError> {
    let mut k = partition_prefix(p).to_vec();
    k.extend_from_slice(&postcard::to_allocvec(key)?);
    Ok(k)
}

impl Store {
    /// Opens (or creates) the store and checks its fingerprint.
    pub fn open(dir: &Path, fingerprint: u64) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let db = DB::open(&opts, dir)?;
        match db.get(FINGERPRINT_KEY)? {
            Some(v) => {
                let found = u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8]));
                if found != fingerprint {
                    return Err(StoreError::Fingerprint {
                        dir: dir.display().to_string(),
                        found,
                        expected: fingerprint,
                    });
                }
            }
            None => {
                let mut w = WriteOptions::default();
                w.set_sync(true);
                db.put_opt(FINGERPRINT_KEY, fingerprint.to_be_bytes(), &w)?;
            }
        }
        Ok(Store { db })
    }

    /// Every stored row of one partition (empty if the partition is unknown).
    pub fn load_partition(&self, p: Partition) -> Result<Vec<StateRow>, StoreError> {
        let prefix = partition_prefix(p);
        let mut rows = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            rows.push(postcard::from_bytes(&v)?);
        }
        Ok(rows)
    }

    /// Applies one flush's changes atomically and durably (fsync).
    pub fn write(&self, changes: &[StateChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for c in changes {
            match c {
                StateChange::Put(p, row) => {
                    batch.put(row_key(*p, &row.key())?, postcard::to_allocvec(row)?);
                }
                StateChange::Delete(p, key) => batch.delete(row_key(*p, key)?),
            }
        }
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db.write_opt(batch, &w)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{DedupRow, PartitionMeta};

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tally-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rows_round_trip_per_partition_and_deletes_apply() {
        let dir = tmp("rt");
        let s = Store::open(&dir, 7).unwrap();
        let meta = StateRow::Meta(PartitionMeta {
            next_offset: 10,
            max_event_ms: Some(5),
            watermark: Some(0),
        });
        let dedup = StateRow::Dedup(
            "o1".into(),
            DedupRow {
                event_ms: 5,
                offset: 9,
            },
        );
        s.write(&[
            StateChange::Put(1, meta.clone()),
            StateChange::Put(1, dedup.clone()),
            StateChange::Put(2, dedup.clone()),
            StateChange::Put(-1, dedup.clone()),
        ])
        .unwrap();
        let mut p1 = s.load_partition(1).unwrap();
        p1.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(p1.len(), 2);
        s.write(&[StateChange::Delete(1, RowKey::Dedup("o1".into()))])
            .unwrap();
        assert_eq!(s.load_partition(1).unwrap(), vec![meta]);
        assert_eq!(s.load_partition(2).unwrap(), vec![dedup.clone()]);
        assert_eq!(s.load_partition(-1).unwrap(), vec![dedup]);
        assert!(s.load_partition(3).unwrap().is_empty());
        drop(s);
        let err = Store::open(&dir, 8).err().unwrap();
        assert!(
            err.to_string().contains("other window definitions"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
