//! Ownership epochs: how readers tell a stale writer's records from the
//! current owner's.
//!
//! Kafka's group tells a pod when it loses a partition, but a pod that does
//! not know (paused past its session timeout) can still have records on
//! the wire after the new owner restored. Each owner of a partition
//! therefore writes under an epoch above every epoch it has seen on the
//! partition's changelog (and not below the wall clock, in case the log
//! lost claims: [`next_epoch`]), and announces it with a **claim** record on that
//! changelog partition, acknowledged before it processes anything. Every
//! changelog record carries its writer's epoch and the input offset it
//! reflects (one header, `tally-writer: <epoch>/<next offset>`: one header
//! costs less per record than two); every `revenue-windows`
//! row carries the epoch in its value. Restore and the view ignore a record
//! of an older epoch that follows one of a newer epoch (within one
//! changelog partition, or one `revenue-windows` key, records arrive in the
//! order they were written, so that can only be a zombie's).
//!
//! The claim is what makes the epochs strictly increase across owners: a
//! later owner reads it during its restore, even when the claimant wrote
//! nothing else. This is not fencing (the broker still accepts a zombie's
//! writes, and compaction may keep a zombie's row over the owner's older
//! one of the same key); ARCHITECTURE.md names what remains.

use super::*;

/// The claim's changelog key. State keys are postcard-encoded `RowKey`s,
/// whose first byte (the variant) is below 0x80, so no row has this key.
pub(super) const CLAIM_KEY: &[u8] = b"\xff\xfftally-claim";
/// The reset's changelog key: written by an owner that rebuilds the
/// partition from the input log, after its claim and before any row.
/// Restore discards every row before it: the old rows still in the
/// compacted changelog belong to another lineage of the state, and mixed
/// with the rebuild's (an old dedup entry beside a re-created window) they
/// drop orders. A key of its own, so compaction keeps the latest reset
/// whatever claims come after it.
pub(super) const RESET_KEY: &[u8] = b"\xff\xfftally-reset";
/// The writer: its ownership epoch, then (after a `/`) the input
/// partition's next offset as of the flush that wrote the record, as
/// decimal text (a claim has the epoch alone).
pub(super) const WRITER_HEADER: &str = "tally-writer";

/// The epoch a new owner claims: above every epoch it has read on the
/// partition's changelog, and never below the wall clock in milliseconds.
/// The log is what orders owners; the clock is only a floor, for a log
/// that lost claims (records deleted by retention or a broker's size
/// limit, which restore refuses to build state from, but a claim still has
/// to beat the lost ones). Clock skew between pods only matters when both
/// the log lost the claims and the skew exceeds the time between two
/// owners' claims.
pub(super) fn next_epoch(max_read: u64, now_ms: i64) -> u64 {
    (max_read + 1).max(u64::try_from(now_ms).unwrap_or(0))
}

/// The header value of a record written under `epoch` at input offset
/// `next_offset`.
pub(super) fn writer_value(epoch: u64, next_offset: i64) -> Vec<u8> {
    format!("{epoch}/{next_offset}").into_bytes()
}

/// The writer epoch of a changelog record; 0 when it has none (written
/// before epochs existed, so older than any claim).
pub(super) fn epoch_of(m: &BorrowedMessage<'_>) -> u64 {
    let Some(headers) = m.headers() else {
        return 0;
    };
    headers
        .iter()
        .find(|h| h.key == WRITER_HEADER)
        .and_then(|h| h.value)
        .and_then(|v| {
            let text = std::str::from_utf8(v).ok()?;
            text.split('/').next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// The claim's value: the state format version (restore checks it like
/// any row's), then the epoch, then the highest epoch the claimant had
/// read before it (its predecessor), then the fingerprint of the window
/// definitions its rows are written under, all big-endian.
///
/// Why the fingerprint: rows are keyed by a definition's index, so rows
/// written under other definitions would restore as this pod's (a
/// currency window's rows as a region window's). Every owner writes a
/// claim before any row, so the latest claim read says which definitions
/// the rows after it mean ([`definitions_of`]).
///
/// Why the predecessor: a pod back on local state reads only the
/// changelog after its checkpoint. If it wrote on after another owner
/// claimed the partition (a stale writer), that claim and the records
/// after it lie *before* its checkpoint, and the tail may still show a
/// later claim, which alone looks like an ordinary handover. Its
/// predecessor, newer than anything the local state has seen, gives
/// the gap away ([`predecessor_of`]).
fn claim_value(epoch: u64, predecessor: u64, definitions: u64) -> Vec<u8> {
    let mut v = vec![crate::state::codec::FORMAT_VERSION];
    v.extend_from_slice(&epoch.to_be_bytes());
    v.extend_from_slice(&predecessor.to_be_bytes());
    v.extend_from_slice(&definitions.to_be_bytes());
    v
}

/// The window definitions' fingerprint a claim's (or reset's) value
/// names; `None` for a claim written before claims named one.
pub(super) fn definitions_of(value: &[u8]) -> Option<u64> {
    value
        .get(17..25)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// The predecessor a claim's (or reset's) value names; `None` for a claim
/// written before claims named one.
pub(super) fn predecessor_of(value: &[u8]) -> Option<u64> {
    value
        .get(9..17)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Keeps the delivery result of the latest claim, by its sequence number
/// (the delivery opaque), so a late report of an earlier claim that timed
/// out is not taken for it.
#[derive(Default)]
pub struct ClaimContext {
    result: Mutex<Option<(usize, Result<i64, KafkaError>)>>,
}

impl ClientContext for ClaimContext {}

impl ProducerContext for ClaimContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, r: &DeliveryResult<'_>, seq: usize) {
        let v = match r {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(e.clone()),
        };
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some((seq, v));
    }
}

/// Writes claims, one at a time, waiting for each acknowledgement. A
/// producer of its own: the pod's producer reports to the flush cycle,
/// and a claim belongs to no batch.
pub(super) struct Claims {
    producer: BaseProducer<ClaimContext>,
    topic: String,
    seq: usize,
    /// The fingerprint of this pod's window definitions, in every claim.
    definitions: u64,
}

impl Claims {
    pub(super) fn new(cfg: &PodConfig) -> Result<Claims, PodError> {
        Ok(Claims {
            producer: run::producer_config(cfg)?.create_with_context(ClaimContext::default())?,
            topic: cfg.topics.changelog_topic.clone(),
            seq: 0,
            definitions: cfg.core()?.state_fingerprint(),
        })
    }

    /// Writes the claim of `epoch` on changelog partition `p`, naming the
    /// highest epoch read before it, and waits for its acknowledgement, at
    /// most `timeout`. Returns its offset.
    pub(super) fn claim(
        &mut self,
        p: Partition,
        epoch: u64,
        predecessor: u64,
        timeout: Duration,
    ) -> Result<i64, PodError> {
        self.write(p, CLAIM_KEY, epoch, predecessor, timeout)
    }

    /// Writes the reset of a rebuild ([`RESET_KEY`]) and waits for it.
    pub(super) fn reset(
        &mut self,
        p: Partition,
        epoch: u64,
        predecessor: u64,
        timeout: Duration,
    ) -> Result<i64, PodError> {
        self.write(p, RESET_KEY, epoch, predecessor, timeout)
    }

    fn write(
        &mut self,
        p: Partition,
        key: &[u8],
        epoch: u64,
        predecessor: u64,
        timeout: Duration,
    ) -> Result<i64, PodError> {
        self.seq += 1;
        let seq = self.seq;
        let value = claim_value(epoch, predecessor, self.definitions);
        let text = epoch.to_string();
        let rec = BaseRecord::with_opaque_to(&self.topic, seq)
            .partition(p)
            .key(key)
            .payload(value.as_slice())
            .headers(OwnedHeaders::new().insert(Header {
                key: WRITER_HEADER,
                value: Some(text.as_bytes()),
            }));
        self.producer.send(rec).map_err(|(e, _)| e)?;
        let deadline = Instant::now() + timeout;
        loop {
            // A zero poll and a short sleep, not `poll(1 ms)`, which spins
            // for the whole millisecond in rdkafka 0.39 (see `flush.rs`).
            self.producer.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_micros(200));
            let mut result = self
                .producer
                .context()
                .result
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((s, r)) = result.take() {
                if s == seq {
                    return Ok(r?);
                }
            }
            drop(result);
            if Instant::now() >= deadline {
                // Not acknowledged: the claim may still land. Harmless: a
                // claim only raises the epoch the next owner starts from.
                self.producer.purge(PurgeConfig::default().queue());
                return Err(PodError::ProduceTimeout(timeout));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_epoch_beats_every_epoch_read_and_the_clock() {
        assert_eq!(next_epoch(0, 1_700_000_000_000), 1_700_000_000_000);
        assert_eq!(
            next_epoch(1_700_000_000_005, 1_700_000_000_000),
            1_700_000_000_006
        );
        assert_eq!(next_epoch(4, -1), 5);
    }

    #[test]
    fn a_claim_names_its_predecessor() {
        let v = claim_value(9, 7, 0xfeed);
        assert_eq!(v[0], crate::state::codec::FORMAT_VERSION);
        assert_eq!(predecessor_of(&v), Some(7));
        assert_eq!(definitions_of(&v), Some(0xfeed));
        // A claim of before predecessors, or definitions, were named.
        assert_eq!(predecessor_of(&v[..9]), None);
        assert_eq!(definitions_of(&v[..17]), None);
    }
}
