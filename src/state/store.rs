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
use crate::telemetry::memory::RocksSizing;
use tally_core::{
    DedupRow, DedupSegment, Partition, RowKey, SessionSet, StateChange, StateReader, StateRow,
};

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

/// `tag ++ partition` (big-endian): every per-partition key and prefix.
fn tagged(tag: u8, p: Partition) -> [u8; 5] {
    let b = p.to_be_bytes();
    [tag, b[0], b[1], b[2], b[3]]
}

/// Every key of partition `p` under `tag`, as a range for `delete_range`.
fn tagged_range(tag: u8, p: Partition) -> (Vec<u8>, Vec<u8>) {
    let end = match p.checked_add(1) {
        Some(next) => tagged(tag, next).to_vec(),
        None => vec![tag + 1],
    };
    (tagged(tag, p).to_vec(), end)
}

fn epoch_key(p: Partition) -> [u8; 5] {
    tagged(EPOCH_PREFIX, p)
}

fn written_key(p: Partition) -> [u8; 5] {
    tagged(WRITTEN_PREFIX, p)
}

fn checkpoint_key(p: Partition) -> [u8; 5] {
    tagged(CHECKPOINT_PREFIX, p)
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

    fn dedup_expiring(
        &mut self,
        p: Partition,
        after: Option<i64>,
        upto_event_ms: i64,
    ) -> Vec<String> {
        let r = self.store.dedup_expiring(p, after, upto_event_ms);
        self.keep(r).unwrap_or_default()
    }

    fn forget_dedup_expiring(&mut self, p: Partition, upto_event_ms: i64) {
        let r = self.store.forget_dedup_expiring(p, upto_event_ms);
        self.keep(r);
    }

    fn sessions(&mut self, p: Partition, spec: u16, customer: &str) -> Option<SessionSet> {
        let r = self.store.sessions(p, spec, customer);
        self.keep(r).flatten()
    }

    fn sessions_ending(
        &mut self,
        p: Partition,
        spec: u16,
        after: Option<i64>,
        upto_last_ms: i64,
    ) -> (Vec<String>, Option<i64>) {
        let r = self.store.sessions_ending(p, spec, after, upto_last_ms);
        self.keep(r).unwrap_or_default()
    }

    fn forget_sessions_ending(&mut self, p: Partition, spec: u16, upto_last_ms: i64) {
        let r = self.store.forget_sessions_ending(p, spec, upto_last_ms);
        self.keep(r);
    }
}

impl StoreReader<'_> {
    /// The value, or `None` with the first error kept.
    fn keep<T>(&mut self, r: Result<T, StoreError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }
}

pub struct Store {
    db: DB,
}

/// A batch putting or deleting each encoded change under its partition's
/// prefix.
fn changes_batch<'a>(changes: impl IntoIterator<Item = &'a Encoded>) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for (p, key, value) in changes {
        let mut k = partition_prefix(*p).to_vec();
        k.extend_from_slice(key);
        match value {
            Some(v) => {
                // The indexes, in the same batch as the row. An entry an
                // index outlives (the id seen again, the session grown or
                // closed, the row deleted) is skipped by the engine when
                // it comes up.
                match key.first() {
                    Some(&DEDUP_KEY_TAG) => {
                        if let Ok(StateRow::Dedup(id, d)) = codec::decode_row(v) {
                            batch.put(dedup_index_key(*p, d.event_ms, id.as_bytes()), []);
                        }
                    }
                    Some(&SEGMENT_KEY_TAG) => {
                        // A segment: its entries become rows of their own
                        // (lookups and the expiry index are per id), and
                        // the segment's key stays with none, so the engine
                        // knows which segments to tombstone.
                        if let Ok(StateRow::DedupSegment(seq, n, seg)) = codec::decode_row(v) {
                            for (id, d) in &seg.entries {
                                let row = StateRow::Dedup(id.clone(), *d);
                                if let Ok(value) = codec::encode_row(&row) {
                                    batch.put(dedup_row_key(*p, id), value);
                                    batch.put(dedup_index_key(*p, d.event_ms, id.as_bytes()), []);
                                }
                            }
                            let mark = StateRow::DedupSegment(
                                seq,
                                n,
                                DedupSegment {
                                    expire_ms: seg.expire_ms,
                                    entries: Vec::new(),
                                },
                            );
                            if let Ok(value) = codec::encode_row(&mark) {
                                batch.put(k, value);
                            }
                            continue;
                        }
                    }
                    Some(&SESSIONS_KEY_TAG) => {
                        if let Ok(StateRow::Sessions(spec, customer, set)) = codec::decode_row(v) {
                            for s in set.sessions.iter().filter(|s| !s.closed) {
                                batch.put(
                                    session_index_key(*p, spec, s.last, customer.as_bytes()),
                                    [],
                                );
                            }
                        }
                    }
                    _ => {}
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

/// The first byte of every encoded dedup segment key
/// (`RowKey::DedupSegment`).
const SEGMENT_KEY_TAG: u8 = 6;

/// The first byte of every encoded session-set key (`RowKey::Sessions`).
const SESSIONS_KEY_TAG: u8 = 1;

/// The close-time index of open sessions: `b'k' ++ partition ++ spec ++
/// last event time ++ customer`, empty values, so the sessions a
/// watermark closes are one range of keys (`Store::sessions_ending`) and
/// the engine keeps no index of the sessions it does not hold.
const SESSION_INDEX_PREFIX: u8 = b'k';

fn session_index_prefix(p: Partition, spec: u16) -> [u8; 7] {
    let [t, b0, b1, b2, b3] = tagged(SESSION_INDEX_PREFIX, p);
    let s = spec.to_be_bytes();
    [t, b0, b1, b2, b3, s[0], s[1]]
}

fn session_index_key(p: Partition, spec: u16, last_ms: i64, customer: &[u8]) -> Vec<u8> {
    index_key(&session_index_prefix(p, spec), last_ms, customer)
}

/// An index key: `prefix ++ time ++ id`, the time with its sign bit
/// flipped, big-endian, so byte order is time order, negative times
/// included. Both indexes (dedup expiry, session close) are made of them.
fn index_key(prefix: &[u8], t: i64, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8 + id.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(&((t as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The time in an index key after its `prefix_len` bytes.
fn index_time(k: &[u8], prefix_len: usize) -> Option<i64> {
    let b: [u8; 8] = k.get(prefix_len..prefix_len + 8)?.try_into().ok()?;
    Some((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

/// The dedup expiry index: `b'x' ++ partition ++ event time ++ id`, empty
/// values, so the entries a watermark expired are one range of keys
/// (`Store::dedup_expiring`), and the engine needs no index in memory.
const DEDUP_INDEX_PREFIX: u8 = b'x';

fn dedup_index_prefix(p: Partition) -> [u8; 5] {
    tagged(DEDUP_INDEX_PREFIX, p)
}

/// The event time with its sign bit flipped, big-endian: byte order is
/// time order, negative times included.
fn dedup_index_key(p: Partition, event_ms: i64, id: &[u8]) -> Vec<u8> {
    index_key(&dedup_index_prefix(p), event_ms, id)
}

/// Postcard's unsigned varint.
fn push_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// The stored key of `RowKey::Dedup(order_id)` in partition `p`, built in
/// one buffer: every new order is a lookup, and building it through
/// `codec::encode_key` cost three allocations (the id copied to a
/// `String`, the encoding, the prefixed key). Pinned to the codec by a
/// test.
fn dedup_row_key(p: Partition, order_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + order_id.len());
    k.extend_from_slice(&partition_prefix(p));
    k.push(DEDUP_KEY_TAG);
    push_varint(&mut k, order_id.len() as u64);
    k.extend_from_slice(order_id.as_bytes());
    k
}

/// The stored key of `RowKey::Sessions(spec, customer)`, likewise.
fn sessions_row_key(p: Partition, spec: u16, customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + customer.len());
    k.extend_from_slice(&partition_prefix(p));
    k.push(SESSIONS_KEY_TAG);
    push_varint(&mut k, u64::from(spec));
    push_varint(&mut k, customer.len() as u64);
    k.extend_from_slice(customer.as_bytes());
    k
}

fn partition_prefix(p: Partition) -> [u8; 5] {
    tagged(ROW_PREFIX, p)
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
        Ok(match self.row(&dedup_row_key(p, order_id))? {
            Some(StateRow::Dedup(_, d)) => Some(d),
            _ => None,
        })
    }

    /// The row stored under `key`, decoded.
    fn row(&self, key: &[u8]) -> Result<Option<StateRow>, StoreError> {
        match self.db.get_pinned(key)? {
            Some(v) => Ok(Some(codec::decode_row(&v)?)),
            None => Ok(None),
        }
    }

    /// The ids in the index under `prefix` whose time is in `(after,
    /// upto]`, ascending, and the time of the first entry beyond `upto`.
    fn index_range(
        &self,
        prefix: &[u8],
        after: Option<i64>,
        upto: i64,
    ) -> Result<(Vec<String>, Option<i64>), StoreError> {
        let from = match after {
            Some(a) => index_key(prefix, a.saturating_add(1), b""),
            None => prefix.to_vec(),
        };
        let mut ids = Vec::new();
        let iter = self
            .db
            .iterator(IteratorMode::From(&from, Direction::Forward));
        for item in iter {
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            let Some(t) = index_time(&k, prefix.len()) else {
                continue;
            };
            if t > upto {
                return Ok((ids, Some(t)));
            }
            if let Some(id) = k
                .get(prefix.len() + 8..)
                .and_then(|b| std::str::from_utf8(b).ok())
            {
                ids.push(id.to_string());
            }
        }
        Ok((ids, None))
    }

    /// Drops the index under `prefix` up to `upto` (not synced: a range
    /// that comes back after a crash is only read again, and each id
    /// checked against its row).
    ///
    /// One point delete per key, not a range delete: this runs at every
    /// flush, and range tombstones pile up in the memtable, where every new
    /// iterator (each flush's index scans) and every read fragments them
    /// all again. At 2,000 orders/s that fragmenting was an eighth of the
    /// pod thread and made flushes slower as the memtable filled.
    fn forget_index(&self, prefix: &[u8], upto: i64) -> Result<(), StoreError> {
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(index_key(prefix, upto.saturating_add(1), b""));
        let mut batch = WriteBatch::default();
        for item in self
            .db
            .iterator_opt(IteratorMode::From(prefix, Direction::Forward), opts)
        {
            let (k, _) = item?;
            batch.delete(k);
        }
        if !batch.is_empty() {
            self.db.write(batch)?;
        }
        Ok(())
    }

    /// The ids of partition `p`'s dedup entries stored with an event time
    /// in `(after, upto_event_ms]`, from the expiry index.
    pub fn dedup_expiring(
        &self,
        p: Partition,
        after: Option<i64>,
        upto_event_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .index_range(&dedup_index_prefix(p), after, upto_event_ms)?
            .0)
    }

    /// Drops the dedup expiry index up to `upto_event_ms`.
    pub fn forget_dedup_expiring(
        &self,
        p: Partition,
        upto_event_ms: i64,
    ) -> Result<(), StoreError> {
        self.forget_index(&dedup_index_prefix(p), upto_event_ms)
    }

    /// The stored session set of `customer` for definition `spec`.
    pub fn sessions(
        &self,
        p: Partition,
        spec: u16,
        customer: &str,
    ) -> Result<Option<SessionSet>, StoreError> {
        Ok(match self.row(&sessions_row_key(p, spec, customer))? {
            Some(StateRow::Sessions(_, _, set)) => Some(set),
            _ => None,
        })
    }

    /// The customers whose stored open sessions of `spec` end (last event)
    /// in `(after, upto_last_ms]`, from the close-time index, and the end
    /// of the first entry beyond.
    pub fn sessions_ending(
        &self,
        p: Partition,
        spec: u16,
        after: Option<i64>,
        upto_last_ms: i64,
    ) -> Result<(Vec<String>, Option<i64>), StoreError> {
        self.index_range(&session_index_prefix(p, spec), after, upto_last_ms)
    }

    /// Drops the close-time index of `spec` up to `upto_last_ms` (not
    /// synced, like [`Store::forget_dedup_expiring`]).
    pub fn forget_sessions_ending(
        &self,
        p: Partition,
        spec: u16,
        upto_last_ms: i64,
    ) -> Result<(), StoreError> {
        self.forget_index(&session_index_prefix(p, spec), upto_last_ms)
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
        self.load_partition_rows(p, true, |_| true)
    }

    /// [`Store::load_partition`], without the dedup entries when
    /// `with_dedup` is false (not even decoded) and without the rows
    /// `keep` refuses: an engine with bounded caches reads them from here
    /// when it needs them, so a restore does not hold them all in memory
    /// even for a moment (36 million dedup entries an hour at 10k
    /// orders/s; ten million open sessions).
    pub fn load_partition_rows(
        &self,
        p: Partition,
        with_dedup: bool,
        keep: impl Fn(&StateRow) -> bool,
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
            let row = codec::decode_row(&v)?;
            if keep(&row) {
                rows.push(row);
            }
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
    pub fn write_encoded_at<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Encoded>,
        checkpoints: &[(Partition, i64)],
        now_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut batch = changes_batch(changes);
        if batch.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        for (p, offset) in checkpoints {
            batch.put(checkpoint_key(*p), offset.to_be_bytes());
            if let Some(now) = now_ms {
                batch.put(written_key(*p), now.to_be_bytes());
            }
        }
        self.write_synced(batch)
    }

    /// One restore step: changelog records of partition `p`, its new
    /// checkpoint and the highest writer epoch applied, in one atomic batch
    /// (a crash between them would let a later tail restore take a stale
    /// writer's records for current ones).
    ///
    /// `sync`: fsync it. A restore syncs only its last step: an earlier
    /// step lost to a machine crash (a process crash loses nothing the
    /// kernel has) takes its checkpoint with it, since RocksDB recovers a
    /// prefix of its write-ahead log, so the restore resumes from the
    /// last step kept; and the pod's first flush after the restore is
    /// synced before any offset is committed. Syncing every step (one a
    /// poll loop, and one each 10,000 records) is a cost that grows with
    /// the state.
    pub fn write_restored(
        &self,
        changes: &[Encoded],
        (p, checkpoint, epoch): (Partition, i64, u64),
        now_ms: i64,
        sync: bool,
    ) -> Result<(), StoreError> {
        let mut batch = changes_batch(changes);
        batch.put(checkpoint_key(p), checkpoint.to_be_bytes());
        batch.put(written_key(p), now_ms.to_be_bytes());
        batch.put(epoch_key(p), epoch.to_be_bytes());
        if sync {
            return self.write_synced(batch);
        }
        self.db.write(batch)?;
        Ok(())
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
        Ok(match self.row(&k)? {
            Some(StateRow::Meta(m)) => Some(m.next_offset),
            _ => None,
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
        // The rows and both indexes.
        for tag in [ROW_PREFIX, DEDUP_INDEX_PREFIX, SESSION_INDEX_PREFIX] {
            let (from, to) = tagged_range(tag, p);
            batch.delete_range(from, to);
        }
        batch.delete(checkpoint_key(p));
        batch.delete(written_key(p));
        batch.delete(epoch_key(p));
        self.write_synced(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::PartitionMeta;

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
        let mut due = s.dedup_expiring(3, None, 10).unwrap();
        due.sort();
        assert_eq!(due, vec!["a", "b", "z"]);
        assert!(s.dedup_expiring(3, Some(10), 10).unwrap().is_empty());
        assert_eq!(s.dedup_expiring(3, Some(10), 100).unwrap(), vec!["c"]);
        // Read again until forgotten (a crash before the deletes were
        // durable reads the range again).
        assert_eq!(s.dedup_expiring(3, None, 10).unwrap().len(), 3);
        s.forget_dedup_expiring(3, 10).unwrap();
        assert_eq!(s.dedup_expiring(3, None, 100).unwrap(), vec!["c"]);
        assert_eq!(s.dedup(4, "d").unwrap().map(|d| d.event_ms), Some(0));
        assert_eq!(s.load_partition(4).unwrap().len(), 1);
        assert!(s
            .load_partition_rows(4, false, |_| true)
            .unwrap()
            .is_empty());
        s.clear_partition(4).unwrap();
        assert!(s.dedup_expiring(4, None, 100).unwrap().is_empty());
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A dedup segment (the changelog's form of dedup entries, written by
    /// a flush and by a restore alike) is stored as one row per entry,
    /// found by lookups, `load_partition` and the expiry index, and the
    /// segment's key with no entries (what the engine needs to tombstone
    /// it). A row for an id that a later segment holds again is the
    /// later one's.
    #[test]
    fn a_dedup_segment_is_stored_as_rows_of_its_own() {
        assert_eq!(
            codec::encode_key(&RowKey::DedupSegment(1, 0)).unwrap()[0],
            SEGMENT_KEY_TAG,
            "the segment key's tag"
        );
        let dir = tmp("segment");
        let s = Store::open(&dir, 7, &sizing()).unwrap();
        let row = |t: i64, offset: i64| DedupRow {
            event_ms: t,
            offset,
        };
        let segment = |seq: i64, entries: Vec<(&str, DedupRow)>| {
            StateChange::Put(
                3,
                StateRow::DedupSegment(
                    seq,
                    0,
                    DedupSegment {
                        expire_ms: 1_000,
                        entries: entries.into_iter().map(|(i, d)| (i.into(), d)).collect(),
                    },
                ),
            )
        };
        s.write(&[segment(10, vec![("a", row(5, 1)), ("b", row(7, 2))])])
            .unwrap();
        s.write(&[segment(20, vec![("a", row(50, 15))])]).unwrap();
        assert_eq!(s.dedup(3, "a").unwrap(), Some(row(50, 15)));
        assert_eq!(s.dedup(3, "b").unwrap(), Some(row(7, 2)));
        let mut due = s.dedup_expiring(3, None, 10).unwrap();
        due.sort();
        assert_eq!(due, vec!["a", "b"], "the index holds each entry");
        let mut rows = s.load_partition(3).unwrap();
        rows.sort_by_key(|r| format!("{r:?}"));
        let marks: Vec<&StateRow> = rows
            .iter()
            .filter(|r| matches!(r, StateRow::DedupSegment(..)))
            .collect();
        assert_eq!(marks.len(), 2);
        for m in &marks {
            let StateRow::DedupSegment(_, _, seg) = m else {
                unreachable!()
            };
            assert!(seg.entries.is_empty(), "the store's copy has no entries");
            assert_eq!(seg.expire_ms, 1_000);
        }
        // Without dedup entries, the segments' keys still come.
        assert_eq!(s.load_partition_rows(3, false, |_| true).unwrap().len(), 2);
        s.write(&[StateChange::Delete(3, RowKey::DedupSegment(10, 0))])
            .unwrap();
        assert_eq!(s.load_partition_rows(3, false, |_| true).unwrap().len(), 1);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The hand-built lookup keys are the codec's, for short and long ids
    /// (a length of 128 or more takes two varint bytes) and any spec.
    #[test]
    fn lookup_keys_are_the_codecs() {
        for id in ["", "o1", &"x".repeat(127), &"y".repeat(300), "ünï"] {
            let mut want = partition_prefix(-3).to_vec();
            want.extend(codec::encode_key(&RowKey::Dedup(id.into())).unwrap());
            assert_eq!(dedup_row_key(-3, id), want, "{id}");
            for spec in [0u16, 3, 200, u16::MAX] {
                let mut want = partition_prefix(7).to_vec();
                want.extend(codec::encode_key(&RowKey::Sessions(spec, id.into())).unwrap());
                assert_eq!(sessions_row_key(7, spec, id), want, "{spec} {id}");
            }
        }
    }

    #[test]
    fn the_close_time_index_returns_the_sessions_a_time_closes() {
        assert_eq!(
            codec::encode_key(&RowKey::Sessions(1, "c".into())).unwrap()[0],
            SESSIONS_KEY_TAG,
            "the session key's tag"
        );
        let dir = tmp("sindex");
        let s = Store::open(&dir, 7, &sizing()).unwrap();
        let session = |start: i64, last: i64, closed: bool| tally_core::Session {
            start,
            last,
            agg: Default::default(),
            offset: 1,
            closed,
        };
        let set = |p: Partition, spec: u16, c: &str, sessions: Vec<tally_core::Session>| {
            StateChange::Put(
                p,
                StateRow::Sessions(
                    spec,
                    c.into(),
                    SessionSet {
                        sessions,
                        retracted: vec![],
                        offset: 1,
                    },
                ),
            )
        };
        s.write(&[
            set(3, 1, "a", vec![session(-20, -5, false)]),
            set(3, 1, "b", vec![session(0, 5, true), session(8, 10, false)]),
            set(3, 1, "c", vec![session(15, 30, false)]),
            // Another definition and another partition are apart.
            set(3, 2, "d", vec![session(0, 1, false)]),
            set(4, 1, "e", vec![session(0, 1, false)]),
        ])
        .unwrap();
        assert_eq!(
            s.sessions_ending(3, 1, None, 10).unwrap(),
            (vec!["a".to_string(), "b".to_string()], Some(30))
        );
        assert_eq!(
            s.sessions_ending(3, 1, Some(10), 40).unwrap(),
            (vec!["c".to_string()], None)
        );
        assert_eq!(s.sessions(3, 1, "b").unwrap().unwrap().sessions.len(), 2);
        assert_eq!(s.sessions(3, 2, "b").unwrap(), None);
        s.forget_sessions_ending(3, 1, 10).unwrap();
        assert_eq!(
            s.sessions_ending(3, 1, None, 100).unwrap().0,
            vec!["c".to_string()]
        );
        assert_eq!(s.sessions_ending(3, 2, None, 100).unwrap().0, vec!["d"]);
        // Only sets with something to emit again are restored.
        let kept = s
            .load_partition_rows(3, true, |r| {
                matches!(r, StateRow::Sessions(_, _, set) if set.sessions.iter().any(|s| s.closed))
            })
            .unwrap();
        assert_eq!(kept.len(), 1);
        s.clear_partition(4).unwrap();
        assert!(s.sessions_ending(4, 1, None, 100).unwrap().0.is_empty());
        assert_eq!(s.sessions_ending(3, 2, None, 100).unwrap().0, vec!["d"]);
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
