//! The RocksDB state store: partition rows and partition meta (offsets and
//! watermarks), written together in one synced `WriteBatch` per flush.
//!
//! Keys are `b's' ++ partition (i32, big-endian) ++ codec key`, so a
//! partition's rows are one contiguous prefix. Values are the versioned
//! encoding of [`StateRow`]s (`state::codec`). The key `b'f'` holds the fingerprint of the window
//! definitions the rows were written under; opening a store written under
//! another fingerprint is refused rather than silently mixing meanings.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use super::codec::{self, CodecError, Encoded};
use crate::core::{DedupRow, Partition, RowKey, StateChange, StateReader, StateRow};
use crate::telemetry::memory::RocksSizing;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
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
const CHECKPOINT_PREFIX: u8 = b'c';
/// When a partition's rows were last written (wall ms): local state older
/// than the changelog's `delete.retention.ms` is not trusted.
const WRITTEN_PREFIX: u8 = b'w';

/// The highest writer epoch the partition's local rows have seen (restore)
/// or this pod has claimed: a tail restore ignores older ones after it.
const EPOCH_PREFIX: u8 = b'e';

fn epoch_key(p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [EPOCH_PREFIX, b[0], b[1], b[2], b[3]]
}

fn written_key(p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [WRITTEN_PREFIX, b[0], b[1], b[2], b[3]]
}

fn checkpoint_key(p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [CHECKPOINT_PREFIX, b[0], b[1], b[2], b[3]]
}

/// The engine's view of the store's rows ([`StateReader`]). A read error
/// is kept, not turned into an answer: the caller must stop before it
/// writes anything the engine decided after it (the engine took the entry
/// for absent), so the record is processed again after a restart.
pub struct StoreReader<'a> {
    store: &'a Store,
    pub error: Option<StoreError>,
}

impl<'a> StoreReader<'a> {
    pub fn new(store: &'a Store) -> StoreReader<'a> {
        StoreReader { store, error: None }
    }

    /// The first read error, if any.
    pub fn result(self) -> Result<(), StoreError> {
        self.error.map_or(Ok(()), Err)
    }
}

impl StateReader for StoreReader<'_> {
    fn dedup(&mut self, p: Partition, order_id: &str) -> Option<DedupRow> {
        match self.store.dedup(p, order_id) {
            Ok(d) => d,
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }

    fn dedup_expiring(&mut self, p: Partition, upto_event_ms: i64) -> Vec<String> {
        match self.store.dedup_expiring(p, upto_event_ms) {
            Ok(ids) => ids,
            Err(e) => {
                self.error.get_or_insert(e);
                Vec::new()
            }
        }
    }
}

pub struct Store {
    db: DB,
}

/// A batch putting or deleting each encoded change under its partition's
/// prefix.
fn changes_batch(changes: &[Encoded]) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for (p, key, value) in changes {
        let mut k = partition_prefix(*p).to_vec();
        k.extend_from_slice(key);
        match value {
            Some(v) => {
                if key.first() == Some(&DEDUP_KEY_TAG) {
                    // The expiry index, in the same batch as the row. An
                    // entry it outlives (the id seen again, or deleted) is
                    // skipped by the engine when it comes up.
                    if let Ok(StateRow::Dedup(id, d)) = codec::decode_row(v) {
                        batch.put(dedup_index_key(*p, d.event_ms, id.as_bytes()), []);
                    }
                }
                batch.put(k, v)
            }
            None => batch.delete(k),
        }
    }
    batch
}

/// The first byte of every encoded dedup key (`RowKey::Dedup`'s variant
/// index in postcard; pinned by a test).
const DEDUP_KEY_TAG: u8 = 2;

/// The dedup expiry index: `b'x' ++ partition ++ event time ++ id`, empty
/// values, so the entries a watermark expired are one range of keys
/// (`Store::dedup_expiring`), and the engine needs no index in memory.
const DEDUP_INDEX_PREFIX: u8 = b'x';

fn dedup_index_prefix(p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [DEDUP_INDEX_PREFIX, b[0], b[1], b[2], b[3]]
}

/// The event time with its sign bit flipped, big-endian: byte order is
/// time order, negative times included.
fn dedup_index_key(p: Partition, event_ms: i64, id: &[u8]) -> Vec<u8> {
    let mut k = dedup_index_prefix(p).to_vec();
    k.extend_from_slice(&((event_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id);
    k
}

fn partition_prefix(p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [ROW_PREFIX, b[0], b[1], b[2], b[3]]
}

impl Store {
    /// Opens (or creates) the store and checks its fingerprint.
    /// `sizing` bounds the block cache and memtables (see `memory.rs`).
    pub fn open(dir: &Path, fingerprint: u64, sizing: &RocksSizing) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_write_buffer_size(sizing.write_buffer_bytes as usize);
        opts.set_max_write_buffer_number(sizing.max_write_buffers);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(sizing.block_cache_bytes as usize));
        // Index and filter blocks count against the cache instead of growing
        // outside it with the number of SST files.
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        // Dedup lookups mostly miss (a new order): a bloom filter answers
        // most misses without reading a data block. Partitioned, with a
        // two-level index: a whole-file filter of a large SST is bigger
        // than a block-cache shard, so it was never cached and every
        // lookup read it from the file and checksummed it (a profile of
        // a million dedup entries: 56 % of the pod's time). Partitions are
        // small blocks the cache keeps; the top level stays pinned.
        table.set_bloom_filter(10.0, false);
        table.set_partition_filters(true);
        table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_pin_top_level_index_and_filter(true);
        table.set_metadata_block_size(4096);
        opts.set_block_based_table_factory(&table);
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

    /// The stored dedup entry of `order_id` in partition `p`, if any: the
    /// durable version, which the engine reads when the entry is not in
    /// its cache.
    pub fn dedup(&self, p: Partition, order_id: &str) -> Result<Option<DedupRow>, StoreError> {
        let mut k = partition_prefix(p).to_vec();
        k.extend_from_slice(&codec::encode_key(&RowKey::Dedup(order_id.to_string()))?);
        Ok(match self.db.get_pinned(k)? {
            Some(v) => match codec::decode_row(&v)? {
                StateRow::Dedup(_, d) => Some(d),
                _ => None,
            },
            None => None,
        })
    }

    /// The ids of partition `p`'s dedup entries stored with an event time
    /// at most `upto_event_ms`, from the expiry index, which then forgets
    /// them (not synced: an index entry lost in a crash only leaves its
    /// row in place, which every lookup takes for expired; a full
    /// restore indexes it again).
    pub fn dedup_expiring(
        &self,
        p: Partition,
        upto_event_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let from = dedup_index_prefix(p).to_vec();
        let to = dedup_index_key(p, upto_event_ms.saturating_add(1), b"");
        let mut ids = Vec::new();
        let iter = self
            .db
            .iterator(IteratorMode::From(&from, Direction::Forward));
        for item in iter {
            let (k, _) = item?;
            if k.as_ref() >= to.as_slice() {
                break;
            }
            if let Some(id) = k.get(13..).and_then(|b| std::str::from_utf8(b).ok()) {
                ids.push(id.to_string());
            }
        }
        if !ids.is_empty() {
            let mut batch = WriteBatch::default();
            batch.delete_range(from, to);
            self.db.write(batch)?;
        }
        Ok(ids)
    }

    /// RocksDB's own memory, bytes: (block cache, memtables).
    pub fn memory(&self) -> (u64, u64) {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        (
            prop("rocksdb.block-cache-usage"),
            prop("rocksdb.cur-size-all-mem-tables"),
        )
    }

    /// Every stored row of one partition (empty if the partition is unknown).
    pub fn load_partition(&self, p: Partition) -> Result<Vec<StateRow>, StoreError> {
        self.load_partition_rows(p, true)
    }

    /// [`Store::load_partition`], without the dedup entries when
    /// `with_dedup` is false: an engine with a bounded dedup cache reads
    /// them from here when it needs them, so a restore does not hold them
    /// all in memory even for a moment (36 million entries an hour at
    /// 10k orders/s).
    pub fn load_partition_rows(
        &self,
        p: Partition,
        with_dedup: bool,
    ) -> Result<Vec<StateRow>, StoreError> {
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
            if !with_dedup && k.get(prefix.len()) == Some(&DEDUP_KEY_TAG) {
                continue;
            }
            rows.push(codec::decode_row(&v)?);
        }
        Ok(rows)
    }

    /// Applies one flush's changes atomically and durably (fsync).
    pub fn write(&self, changes: &[StateChange]) -> Result<(), StoreError> {
        let encoded = changes
            .iter()
            .map(codec::encode)
            .collect::<Result<Vec<_>, _>>()?;
        self.write_encoded(&encoded, &[])
    }

    /// Applies encoded changes and the changelog checkpoints (the highest
    /// changelog offset each partition's rows now reflect) in one synced batch.
    pub fn write_encoded(
        &self,
        changes: &[Encoded],
        checkpoints: &[(Partition, i64)],
    ) -> Result<(), StoreError> {
        self.write_encoded_at(changes, checkpoints, None)
    }

    /// [`Store::write_encoded`], also recording `now_ms` as the time each
    /// checkpointed partition's state was last written.
    pub fn write_encoded_at(
        &self,
        changes: &[Encoded],
        checkpoints: &[(Partition, i64)],
        now_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        if changes.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        let mut batch = changes_batch(changes);
        for (p, offset) in checkpoints {
            batch.put(checkpoint_key(*p), offset.to_be_bytes());
            if let Some(now) = now_ms {
                batch.put(written_key(*p), now.to_be_bytes());
            }
        }
        self.write_synced(batch)
    }

    /// One restore step: changelog records of partition `p`, its new
    /// checkpoint and the highest writer epoch applied, in one synced batch
    /// (a crash between them would let a later tail restore take a stale
    /// writer's records for current ones).
    pub fn write_restored(
        &self,
        changes: &[Encoded],
        p: Partition,
        checkpoint: i64,
        epoch: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut batch = changes_batch(changes);
        batch.put(checkpoint_key(p), checkpoint.to_be_bytes());
        batch.put(written_key(p), now_ms.to_be_bytes());
        batch.put(epoch_key(p), epoch.to_be_bytes());
        self.write_synced(batch)
    }

    /// Writes `batch` atomically and durably (fsync).
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db.write_opt(batch, &w)?;
        Ok(())
    }

    /// Records the ownership epoch this pod claimed for partition `p`.
    pub fn set_epoch(&self, p: Partition, epoch: u64) -> Result<(), StoreError> {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        self.db.put_opt(epoch_key(p), epoch.to_be_bytes(), &w)?;
        Ok(())
    }

    /// The highest writer epoch recorded for partition `p`.
    pub fn epoch(&self, p: Partition) -> Result<Option<u64>, StoreError> {
        Ok(self
            .db
            .get(epoch_key(p))?
            .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes)))
    }

    /// The input offset to resume partition `p` from, per its local meta
    /// row, without loading the partition.
    pub fn next_offset(&self, p: Partition) -> Result<Option<i64>, StoreError> {
        let mut k = partition_prefix(p).to_vec();
        k.extend_from_slice(&codec::encode_key(&RowKey::Meta)?);
        Ok(match self.db.get(k)? {
            Some(v) => match codec::decode_row(&v)? {
                StateRow::Meta(m) => Some(m.next_offset),
                _ => None,
            },
            None => None,
        })
    }

    /// When this partition's local state was last written (wall ms), if
    /// recorded.
    pub fn written_at(&self, p: Partition) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get(written_key(p))?
            .and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes)))
    }

    /// The highest changelog offset this partition's local rows reflect.
    pub fn checkpoint(&self, p: Partition) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get(checkpoint_key(p))?
            .and_then(|v| v.as_slice().try_into().ok().map(i64::from_be_bytes)))
    }

    /// Removes every row and the checkpoint of a partition (its local state
    /// is stale beyond repair, e.g. the changelog was recreated).
    pub fn clear_partition(&self, p: Partition) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let from = partition_prefix(p);
        let to = match p.checked_add(1) {
            Some(next) => partition_prefix(next).to_vec(),
            None => vec![ROW_PREFIX + 1],
        };
        batch.delete_range(from.to_vec(), to);
        let index = dedup_index_prefix(p);
        let index_end = match p.checked_add(1) {
            Some(next) => dedup_index_prefix(next).to_vec(),
            None => vec![DEDUP_INDEX_PREFIX + 1],
        };
        batch.delete_range(index.to_vec(), index_end);
        batch.delete(checkpoint_key(p));
        batch.delete(written_key(p));
        batch.delete(epoch_key(p));
        self.write_synced(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{DedupRow, PartitionMeta};

    fn sizing() -> RocksSizing {
        RocksSizing::for_limit(
            256 << 20,
            crate::telemetry::memory::LimitSource::Config,
            0.25,
        )
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tally-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_dedup_expiry_index_returns_what_a_time_expired_once() {
        assert_eq!(
            codec::encode_key(&RowKey::Dedup("o1".into())).unwrap()[0],
            DEDUP_KEY_TAG,
            "the dedup key's tag"
        );
        let dir = tmp("index");
        let s = Store::open(&dir, 7, &sizing()).unwrap();
        let dedup = |id: &str, t: i64| {
            StateChange::Put(
                3,
                StateRow::Dedup(
                    id.into(),
                    DedupRow {
                        event_ms: t,
                        offset: 1,
                    },
                ),
            )
        };
        s.write(&[dedup("a", -5), dedup("b", 10), dedup("c", 20)])
            .unwrap();
        s.write(&[dedup("z", 10)]).unwrap();
        // Another partition's entries are not this one's.
        s.write(&[StateChange::Put(
            4,
            StateRow::Dedup(
                "d".into(),
                DedupRow {
                    event_ms: 0,
                    offset: 1,
                },
            ),
        )])
        .unwrap();
        let mut due = s.dedup_expiring(3, 10).unwrap();
        due.sort();
        assert_eq!(due, vec!["a", "b", "z"]);
        assert!(s.dedup_expiring(3, 10).unwrap().is_empty(), "once");
        assert_eq!(s.dedup_expiring(3, 100).unwrap(), vec!["c"]);
        assert_eq!(s.dedup(4, "d").unwrap().map(|d| d.event_ms), Some(0));
        assert_eq!(s.load_partition(4).unwrap().len(), 1);
        assert!(s.load_partition_rows(4, false).unwrap().is_empty());
        s.clear_partition(4).unwrap();
        assert!(s.dedup_expiring(4, 100).unwrap().is_empty());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn rows_round_trip_per_partition_and_deletes_apply() {
        let dir = tmp("rt");
        let s = Store::open(&dir, 7, &sizing()).unwrap();
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
        s.write_encoded(&[], &[(2, 41)]).unwrap();
        assert_eq!(s.checkpoint(2).unwrap(), Some(41));
        s.clear_partition(2).unwrap();
        assert!(s.load_partition(2).unwrap().is_empty());
        assert_eq!(s.checkpoint(2).unwrap(), None);
        assert_eq!(s.load_partition(1).unwrap().len(), 1);
        drop(s);
        let s = Store::open(&dir, 7, &sizing()).unwrap();
        drop(s);
        let err = Store::open(&dir, 8, &sizing()).err().unwrap();
        assert!(
            err.to_string().contains("other window definitions"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
