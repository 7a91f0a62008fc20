//! The consumer pod: Kafka in, the core in the middle, outputs and RocksDB out.
//!
//! **Guarantee.** Window results are exact (no order lost or counted twice)
//! across crashes and rebalances; output topics are at-least-once. This
//! holds because of the flush order:
//! 1. produce every output of the micro-batch and wait for all acks
//!    (idempotent producer, `acks=all`);
//! 2. write the dirty rows and the partition meta (next offset, watermark)
//!    to RocksDB in one synced batch;
//! 3. commit the offsets to Kafka.
//!
//! A crash before 2 loses nothing: the pod resumes from the offsets in
//! RocksDB, and the core ignores records already folded into a row. A crash
//! between 2 and 3 is harmless too: RocksDB wins over the group's committed
//! offsets. **Precondition:** a partition's state directory is used by one
//! pod at a time; Kafka's group assignment provides that.
//!
//! One thread runs the loop. Rebalance callbacks run inside `poll` on the
//! same thread; they lock the processor, which the loop never holds while
//! polling.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, info_span, trace_span, warn};

use crate::config::PodConfig;
use crate::core::order::MICROS;
use crate::core::{Currency, Effect, Engine, FlushId, Partition, Reason, StateRow};
use crate::fx::{self, FxFollower};
use crate::memory::RocksSizing;
use crate::metrics::Metrics;
use crate::output::{OutRecord, Outputs, Source};
use crate::store::{encode, Encoded, Store, StoreError};
use crate::view::ProgressRecord;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("FX rates: {0}")]
    Fx(#[from] fx::FxError),
    #[error("input topic {0} does not exist (create it, or run `tally topics apply`)")]
    NoInputTopic(String),
    #[error("outputs were not acknowledged within {0:?}")]
    ProduceTimeout(Duration),
    #[error("cannot create the state directory {dir}: {source}")]
    StateDir { dir: String, source: std::io::Error },
    #[error("the pod thread panicked")]
    Panicked,
}

/// Counters of what the pod did. Updated once per record batch or flush.
#[derive(Debug, Default)]
pub struct Stats {
    pub records: AtomicU64,
    pub valid: AtomicU64,
    pub invalid: AtomicU64,
    pub late: AtomicU64,
    pub duplicates: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_failures: AtomicU64,
    pub commit_failures: AtomicU64,
    pub rebalances: AtomicU64,
    pub restored_rows: AtomicU64,
    /// Set once the group has given this pod an assignment (possibly empty).
    pub joined: AtomicBool,
    /// Consumer lag summed over the held partitions, at the last check.
    pub lag: AtomicU64,
    /// Assigned partitions still restoring: the pod is not ready for them.
    pub restoring: Mutex<Vec<Partition>>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

const PENDING: u8 = 0;
const IN_FLIGHT: u8 = 1;
const ACKED: u8 = 2;
const FAILED: u8 = 3;

/// Which of a flush's two record sequences a delivery report belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// The batch's outputs, sent as they are made.
    Outputs = 0,
    /// The batch's changelog rows, sent once every output is acknowledged.
    Changelog = 1,
}

/// The top bit of a delivery opaque names the lane; the rest is the index.
const LANE_BIT: usize = 1 << (usize::BITS - 1);

impl Lane {
    fn opaque(self, index: usize) -> usize {
        match self {
            Lane::Outputs => index,
            Lane::Changelog => index | LANE_BIT,
        }
    }

    fn of(opaque: usize) -> (Lane, usize) {
        if opaque & LANE_BIT != 0 {
            (Lane::Changelog, opaque & !LANE_BIT)
        } else {
            (Lane::Outputs, opaque)
        }
    }
}

/// The delivery state of one lane. The counters let the flush wait for
/// "everything acknowledged" without scanning tens of thousands of
/// statuses on every 1 ms poll.
#[derive(Default)]
struct Acks {
    status: Vec<u8>,
    acked: usize,
    failed: usize,
}

impl Acks {
    fn reset(&mut self, len: usize) {
        self.status.clear();
        self.status.resize(len, PENDING);
        self.acked = 0;
        self.failed = 0;
    }
}

/// Records delivery results by lane and index into the current flush's records.
pub struct AckContext {
    lanes: [Mutex<Acks>; 2],
    changelog_topic: String,
    /// Highest acknowledged changelog offset per partition, this flush.
    changelog_max: Mutex<HashMap<Partition, i64>>,
}

impl AckContext {
    fn lane(&self, lane: Lane) -> MutexGuard<'_, Acks> {
        self.lanes[lane as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let ok = result.is_ok();
        match result {
            Err((e, _)) => warn!(error = %e, "an output was not delivered; it will be sent again"),
            Ok(m) if m.topic() == self.changelog_topic => {
                if let Ok(mut max) = self.changelog_max.lock() {
                    let e = max.entry(m.partition()).or_insert(m.offset());
                    *e = (*e).max(m.offset());
                }
            }
            Ok(_) => {}
        }
        let (lane, index) = Lane::of(opaque);
        let mut acks = self.lane(lane);
        if let Some(slot) = acks.status.get_mut(index) {
            // Only a record in flight can be acknowledged; anything else is a
            // report from a batch that was abandoned.
            if *slot == IN_FLIGHT {
                *slot = if ok { ACKED } else { FAILED };
                if ok {
                    acks.acked += 1;
                } else {
                    acks.failed += 1;
                }
            }
        }
    }
}

/// Everything the loop and the rebalance callbacks share.
pub struct Processor {
    cfg: PodConfig,
    /// `cfg.input_topic`, shared: lent to every output record's source.
    input_topic: Arc<str>,
    engine: Engine,
    store: Store,
    producer: BaseProducer<AckContext>,
    out: Vec<OutRecord>,
    /// How many of `out` have been offered to the producer (`send_new`).
    out_offered: usize,
    /// The producer's queue was full: leave the rest of the batch to the flush.
    send_blocked: bool,
    /// Outputs of the batch are being retried: keep their delivery status.
    retrying: bool,
    /// Changelog records of the batch, produced once `out` is acknowledged.
    changelog_out: Vec<OutRecord>,
    /// Phase of a retried flush: the outputs are acknowledged, the
    /// changelog records not yet.
    outputs_acked: bool,
    /// The drained state changes waiting for their outputs' acks.
    pending_changes: Option<(FlushId, Vec<Encoded>)>,
    effects: Vec<Effect>,
    pending: usize,
    last_flush: Instant,
    held: BTreeSet<Partition>,
    stats: Arc<Stats>,
    fx_follower: Option<FxFollower>,
    metrics: Arc<Metrics>,
    /// Counts not yet added to the Prometheus counters (updated per flush).
    unreported: Counts,
    /// The progress last published per partition.
    published: HashMap<Partition, (i64, Option<i64>, bool)>,
    /// Assigned partitions whose state is being restored, in order; their
    /// fetches are paused meanwhile.
    restoring: BTreeMap<Partition, Restoring>,
    /// Fetching is paused for every partition (outputs unacknowledged).
    fetch_paused: bool,
}

/// The progress of one partition's restore from the changelog.
struct Restoring {
    started: Instant,
    /// Reads the changelog partition; created at the first step.
    reader: Option<BaseConsumer>,
    /// The changelog's end when the restore began (exclusive).
    high: i64,
    /// The last changelog offset applied to the store.
    last: i64,
    /// Records applied so far.
    count: u64,
    /// The restore failed: the partition is rebuilt from the input log.
    failed: bool,
}

impl Restoring {
    fn new() -> Restoring {
        Restoring {
            started: Instant::now(),
            reader: None,
            high: 0,
            last: -1,
            count: 0,
            failed: false,
        }
    }
}

/// Per-batch counts, added to the metrics at flush.
#[derive(Default)]
struct Counts {
    records: u64,
    valid: u64,
    late: u64,
    duplicate: u64,
    invalid: [u64; Reason::ALL.len()],
    /// Accepted revenue by currency, in micro-units (a handful of currencies:
    /// a linear scan beats a map).
    revenue: Vec<(Currency, i64)>,
}

impl Counts {
    fn add_revenue(&mut self, currency: Currency, micros: i64) {
        match self.revenue.iter_mut().find(|(c, _)| *c == currency) {
            Some((_, sum)) => *sum += micros,
            None => self.revenue.push((currency, micros)),
        }
    }
}

fn lock(p: &Mutex<Processor>) -> MutexGuard<'_, Processor> {
    // A panic while holding the lock leaves nothing half-done that a
    // restart would not redo, so a poisoned lock is still usable.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Processor {
    /// Converts effects to output records.
    fn emit(&mut self, original: Option<(&[u8], Option<&[u8]>)>, src: Source<'_>) {
        let outputs = Outputs { cfg: &self.cfg };
        let (mut valid, mut late, mut dup) = (0, 0, 0);
        let payload = original.map(|o| o.0).unwrap_or_default();
        for e in self.effects.drain(..) {
            match e {
                Effect::Accepted {
                    order,
                    alert,
                    offset,
                    partition,
                    ..
                } => {
                    valid += 1;
                    self.unreported
                        .add_revenue(order.order.currency, order.order.amount_micros);
                    outputs.accepted(
                        payload,
                        &order,
                        alert,
                        Source {
                            offset,
                            partition,
                            ..src
                        },
                        &mut self.out,
                    );
                }
                Effect::Late {
                    order,
                    alert,
                    offset,
                    partition,
                } => {
                    late += 1;
                    outputs.late(
                        payload,
                        &order,
                        alert,
                        Source {
                            offset,
                            partition,
                            ..src
                        },
                        &mut self.out,
                    );
                }
                Effect::Rejected {
                    rejection,
                    offset,
                    partition,
                } => {
                    if let Some(i) = Reason::ALL.iter().position(|r| *r == rejection.reason) {
                        self.unreported.invalid[i] += 1;
                    }
                    debug!(topic = src.topic, partition, offset, reason = %rejection.reason, "rejected");
                    let key = original.and_then(|o| o.1);
                    outputs.rejected(
                        payload,
                        key,
                        &rejection,
                        Source {
                            offset,
                            partition,
                            ..src
                        },
                        &mut self.out,
                    );
                }
                Effect::Duplicate { .. } => dup += 1,
                Effect::Window(w) => outputs.window(&w, &mut self.out),
                Effect::Retracted {
                    partition,
                    spec_name,
                    key,
                } => outputs.retracted(partition, &spec_name, &key, &mut self.out),
            }
        }
        self.unreported.valid += valid;
        self.unreported.late += late;
        self.unreported.duplicate += dup;
    }

    /// Outputs of effects that no input record carries (ticks, flushes,
    /// restores: window updates and retractions).
    fn emit_engine(&mut self) {
        let topic = self.input_topic.clone();
        self.emit(
            None,
            Source {
                topic: &topic,
                partition: -1,
                offset: -1,
            },
        );
    }

    fn on_message(&mut self, p: Partition, offset: i64, key: Option<&[u8]>, payload: &[u8]) {
        if !self.restoring.is_empty() && self.restoring.contains_key(&p) {
            // Fetched before the pause took effect: the seek after the
            // restore reads it again.
            return;
        }
        // An Arc: lending the topic to `emit` must not cost an allocation per record.
        let topic = self.input_topic.clone();
        let _span = trace_span!("record", topic = %topic, partition = p, offset).entered();
        self.engine
            .on_record(p, offset, payload, now_ms(), &mut self.effects);
        self.emit(
            Some((payload, key)),
            Source {
                topic: &topic,
                partition: p,
                offset,
            },
        );
        self.send_new();
        self.pending += 1;
        self.unreported.records += 1;
    }

    fn tick(&mut self) {
        self.engine.tick(now_ms(), &mut self.effects);
        self.emit_engine();
        if let Some(f) = self.fx_follower.as_mut() {
            let n = f.poll_updates(self.engine.fx_mut());
            if n > 0 {
                info!(updates = n, "applied FX rate updates");
            }
        }
    }

    /// Starts taking over a partition, inside the rebalance callback: only
    /// cheap work here. The partition is queued for restore and its fetches
    /// stay paused until [`Processor::restore_step`] has brought its state
    /// up to date. Returns the offset to assign it at: the local resume
    /// offset, or the beginning. Either is explicit, so librdkafka does not
    /// look up the committed offset, which could land after our seek.
    fn begin_take(&mut self, p: Partition) -> Offset {
        self.engine.revoke(p);
        self.restoring.insert(p, Restoring::new());
        self.restoring_changed();
        match self.store.next_offset(p) {
            Ok(Some(o)) => Offset::Offset(o),
            _ => Offset::Beginning,
        }
    }

    /// Advances the restore of one queued partition for at most `budget`,
    /// outside the rebalance callback: the main loop keeps polling the group
    /// between steps, so a long restore cannot stall a rebalance or exceed
    /// `max.poll.interval.ms`.
    fn restore_step(&mut self, consumer: &BaseConsumer<PodContext>, budget: Duration) {
        let Some(p) = self.restoring.keys().next().copied() else {
            return;
        };
        let deadline = Instant::now() + budget;
        let done = match self.catch_up_from_changelog(p, deadline) {
            Ok(done) => done,
            Err(e) => {
                // A partial restore must not mix with a rebuild: start the
                // partition over from an empty store.
                error!(partition = p, error = %e, "cannot restore the partition's state; rebuilding it from the log");
                if let Err(e) = self.store.clear_partition(p) {
                    error!(partition = p, error = %e, "cannot clear the partition's local state");
                }
                if let Some(r) = self.restoring.get_mut(&p) {
                    r.reader = None;
                    r.failed = true;
                }
                true
            }
        };
        if !done {
            return;
        }
        let Some(r) = self.restoring.remove(&p) else {
            return;
        };
        self.restoring_changed();
        self.metrics
            .restore_remaining
            .with_label_values(&[&p.to_string()])
            .set(0);
        let next = if r.failed {
            self.engine.assign(p, now_ms());
            None
        } else {
            match self.store.load_partition(p) {
                Ok(rows) => {
                    let next = rows.iter().find_map(|r| match r {
                        StateRow::Meta(m) => Some(m.next_offset),
                        _ => None,
                    });
                    info!(partition = p, rows = rows.len(), from_changelog = r.count, resume_from = ?next, ms = r.started.elapsed().as_millis() as u64, "partition restored");
                    self.engine.restore(p, rows, now_ms(), &mut self.effects);
                    self.emit_engine();
                    next
                }
                Err(e) => {
                    error!(partition = p, error = %e, "cannot load the partition's state; rebuilding it from the log");
                    let _ = self.store.clear_partition(p);
                    self.engine.assign(p, now_ms());
                    None
                }
            }
        };
        self.held.insert(p);
        self.metrics.assigned_partitions.set(self.held.len() as i64);
        self.metrics
            .restore_duration
            .observe(r.started.elapsed().as_secs_f64());
        // RocksDB wins over the group's committed offset; without local
        // state the partition is rebuilt from the start of the log.
        let offset = next.map_or(Offset::Beginning, Offset::Offset);
        if let Err(e) = consumer.seek(&self.cfg.input_topic, p, offset, Duration::from_secs(10)) {
            error!(partition = p, error = %e, "seek after restore failed");
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.cfg.input_topic, p);
        if !self.fetch_paused {
            if let Err(e) = consumer.resume(&tpl) {
                error!(partition = p, error = %e, "resume after restore failed");
            }
        }
    }

    /// Applies the changelog records of partition `p` that the local store
    /// has not seen (after its checkpoint) to the store, until `deadline`.
    /// Returns whether the partition has caught up.
    fn catch_up_from_changelog(
        &mut self,
        p: Partition,
        deadline: Instant,
    ) -> Result<bool, PodError> {
        let topic = self.cfg.changelog_topic.clone();
        let Some(r) = self.restoring.get_mut(&p) else {
            return Ok(true);
        };
        if r.failed {
            return Ok(true);
        }
        if r.reader.is_none() {
            let reader: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &self.cfg.brokers)
                .set("group.id", "tally-restore")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .set("fetch.wait.max.ms", "10")
                .create()?;
            let (low, high) = reader.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            let mut checkpoint = self.store.checkpoint(p)?;
            debug!(partition = p, low, high, checkpoint = ?checkpoint, "changelog catch-up");
            if checkpoint.is_some_and(|c| c >= high) {
                // The local rows claim records the changelog never had: it
                // was recreated. Local state cannot be trusted; rebuild from it.
                warn!(partition = p, checkpoint = ?checkpoint, high, "local state is ahead of the changelog; discarding it");
                self.store.clear_partition(p)?;
                checkpoint = None;
            }
            let from = checkpoint.map_or(low, |c| (c + 1).max(low));
            r.high = high;
            r.last = from - 1;
            if from < high {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, p, Offset::Offset(from))?;
                reader.assign(&tpl)?;
            }
            r.reader = Some(reader);
        }
        let (high, mut last) = (r.high, r.last);
        let Some(reader) = r.reader.as_ref() else {
            return Ok(true);
        };
        let mut batch: Vec<Encoded> = Vec::with_capacity(10_000);
        let mut count = 0u64;
        let mut caught_up = last + 1 >= high;
        while !caught_up && Instant::now() < deadline {
            let Some(msg) = reader.poll(Duration::from_millis(10)) else {
                // Compaction may have removed the last offsets.
                let pos = reader.position()?;
                caught_up = pos
                    .elements_for_topic(&topic)
                    .iter()
                    .any(|e| matches!(e.offset(), Offset::Offset(o) if o >= high));
                continue;
            };
            let m = msg?;
            last = m.offset();
            if let Some(k) = m.key() {
                batch.push((p, k.to_vec(), m.payload().map(<[u8]>::to_vec)));
                count += 1;
            }
            caught_up = last + 1 >= high;
            if batch.len() >= 10_000 {
                self.store.write_encoded(&batch, &[(p, last)])?;
                batch.clear();
            }
        }
        let checkpoint = if caught_up { high - 1 } else { last };
        if checkpoint >= 0 && (caught_up || !batch.is_empty()) {
            self.store.write_encoded(&batch, &[(p, checkpoint)])?;
        }
        r.last = last;
        r.count += count;
        self.metrics.restore_records.inc_by(count);
        add(&self.stats.restored_rows, count);
        self.metrics
            .restore_remaining
            .with_label_values(&[&p.to_string()])
            .set((high - 1 - last).max(0));
        Ok(caught_up)
    }

    /// Publishes the set of restoring partitions to metrics and readiness.
    fn restoring_changed(&self) {
        self.metrics
            .restoring_partitions
            .set(self.restoring.len() as i64);
        if let Ok(mut r) = self.stats.restoring.lock() {
            *r = self.restoring.keys().copied().collect();
        }
    }

    fn release_partition(&mut self, p: Partition) {
        if self.restoring.remove(&p).is_some() {
            self.restoring_changed();
            let _ = self
                .metrics
                .restore_remaining
                .remove_label_values(&[&p.to_string()]);
        }
        self.engine.revoke(p);
        self.held.remove(&p);
        self.published.remove(&p);
        self.metrics.assigned_partitions.set(self.held.len() as i64);
        let label = p.to_string();
        let _ = self.metrics.watermark.remove_label_values(&[&label]);
        let _ = self.metrics.watermark_delay.remove_label_values(&[&label]);
        let _ = self
            .metrics
            .log_end_offset
            .remove_label_values(&[&self.cfg.input_topic, &label]);
        let _ = self.metrics.consumergroup_lag.remove_label_values(&[
            &self.cfg.group,
            &self.cfg.input_topic,
            &label,
        ]);
        info!(partition = p, "partition released");
    }

    /// The flush: outputs acknowledged, then one RocksDB batch, then the
    /// Kafka commit. On a produce timeout nothing is written or committed,
    /// and the next call retries the same outputs.
    fn flush(
        &mut self,
        consumer: &BaseConsumer<PodContext>,
        budget: Duration,
    ) -> Result<(), PodError> {
        let span = info_span!("flush", topic = %self.cfg.input_topic, records = self.pending);
        let _g = span.enter();
        let started = Instant::now();
        if !self.retrying {
            let mut changes = Vec::new();
            let id = self.engine.flush(&mut self.effects, &mut changes);
            self.emit_engine();
            self.publish_progress();
            // The window updates leave first: encoding the state rows is
            // not on the path of what a reader sees.
            self.send_new();
            // Each changed row goes to the changelog, but only after every
            // output is acknowledged: the changelog must never be ahead of
            // the outputs, or a pod restoring from it would skip records
            // whose outputs were lost. Then to RocksDB.
            let encoded = changes.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
            for (p, key, value) in &encoded {
                self.changelog_out.push(OutRecord {
                    topic: self.cfg.changelog_topic.clone(),
                    partition: Some(*p),
                    key: Some(key.clone()),
                    payload: value.clone(),
                    headers: Vec::new(),
                });
            }
            self.pending_changes = Some((id, encoded));
            self.producer
                .context()
                .lane(Lane::Changelog)
                .reset(self.changelog_out.len());
            if let Ok(mut m) = self.producer.context().changelog_max.lock() {
                m.clear();
            }
        }
        let produce_started = Instant::now();
        if !self.outputs_acked {
            if let Err(e) = self.produce_all(Lane::Outputs, &self.out, started + budget) {
                return Err(self.flush_failed(e));
            }
            self.outputs_acked = true;
        }
        if let Err(e) = self.produce_all(Lane::Changelog, &self.changelog_out, started + budget) {
            return Err(self.flush_failed(e));
        }
        self.retrying = false;
        self.outputs_acked = false;
        let Some((id, changes)) = self.pending_changes.take() else {
            return Ok(());
        };
        let produced = produce_started.elapsed();
        let checkpoints: Vec<(Partition, i64)> = self
            .producer
            .context()
            .changelog_max
            .lock()
            .map(|m| m.iter().map(|(p, o)| (*p, *o)).collect())
            .unwrap_or_default();
        self.store.write_encoded(&changes, &checkpoints)?;
        let written = produce_started.elapsed();
        self.commit(consumer);
        self.engine.on_durable(id);
        add(&self.stats.flushes, 1);
        self.report(started);
        self.update_lag(consumer);
        debug!(
            outputs = self.out.len(),
            rows = changes.len(),
            engine_us = (produce_started - started).as_micros() as u64,
            produce_us = produced.as_micros() as u64,
            write_us = (written - produced).as_micros() as u64,
            commit_us = (produce_started.elapsed() - written).as_micros() as u64,
            "flushed"
        );
        self.clear_batch();
        self.pending = 0;
        // The interval runs from flush start to flush start: a flush that
        // takes 50 ms of a 100 ms interval does not stretch the cycle to
        // 150 ms (every window update would wait that much longer).
        self.last_flush = started;
        Ok(())
    }

    /// A flush that could not get its records acknowledged: the next call
    /// retries the same batch.
    fn flush_failed(&mut self, e: PodError) -> PodError {
        self.retrying = true;
        add(&self.stats.flush_failures, 1);
        self.metrics.flush_failures.inc();
        e
    }

    /// Offers the outputs made since the last call to the producer, so
    /// librdkafka batches and delivers them while the pod goes on
    /// processing, and the flush waits only for the last acks. Sending early
    /// changes nothing about delivery: outputs were always at-least-once,
    /// and nothing is committed before every output is acknowledged. A full
    /// queue is not an error here: what is not sent now, the flush sends.
    fn send_new(&mut self) {
        let (start, end) = (self.out_offered, self.out.len());
        if start == end {
            return;
        }
        self.out_offered = end;
        let mut acks = self.producer.context().lane(Lane::Outputs);
        acks.status.resize(end, PENDING);
        if self.send_blocked {
            return;
        }
        // Holding the lane is safe: `send` never runs delivery callbacks
        // (only `poll` does, on this thread).
        for i in start..end {
            match self
                .producer
                .send(base_record(&self.out[i], Lane::Outputs.opaque(i)))
            {
                Ok(()) => acks.status[i] = IN_FLIGHT,
                Err(_) => {
                    self.send_blocked = true;
                    break;
                }
            }
        }
    }

    /// Sends every record of `lane` not yet acknowledged and waits for the
    /// acks; failed ones are sent again, until `deadline`.
    fn produce_all(
        &self,
        lane: Lane,
        records: &[OutRecord],
        deadline: Instant,
    ) -> Result<(), PodError> {
        let ctx = self.producer.context();
        loop {
            let todo: Vec<usize> = {
                let mut acks = ctx.lane(lane);
                acks.status.resize(records.len(), PENDING);
                acks.status
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| **s == PENDING || **s == FAILED)
                    .map(|(i, _)| i)
                    .collect()
            };
            for i in todo {
                send(&self.producer, &records[i], lane, i, deadline)?;
            }
            // Not `Producer::flush`: in rdkafka 0.39 `BaseProducer::poll(t)`
            // always runs for the whole of `t`, so `flush` waits out a 100 ms
            // poll on every call. Short polls return as soon as the last
            // delivery report is served.
            loop {
                let (acked, failed) = {
                    let acks = ctx.lane(lane);
                    (acks.acked, acks.failed)
                };
                if acked >= records.len() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(PodError::ProduceTimeout(self.last_flush.elapsed()));
                }
                if failed > 0 {
                    break;
                }
                self.producer.poll(Duration::from_millis(1));
            }
        }
    }

    /// Forgets the batch's records and their delivery state.
    fn clear_batch(&mut self) {
        self.out.clear();
        self.changelog_out.clear();
        self.out_offered = 0;
        self.send_blocked = false;
        let ctx = self.producer.context();
        ctx.lane(Lane::Outputs).reset(0);
        ctx.lane(Lane::Changelog).reset(0);
    }

    fn commit(&self, consumer: &BaseConsumer<PodContext>) {
        let mut tpl = TopicPartitionList::new();
        for p in &self.held {
            if let Some(s) = self.engine.status(*p) {
                if s.next_offset > 0 {
                    let _ = tpl.add_partition_offset(
                        &self.cfg.input_topic,
                        *p,
                        Offset::Offset(s.next_offset),
                    );
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            // Not fatal: RocksDB holds the offsets and wins on restart.
            add(&self.stats.commit_failures, 1);
            self.metrics.commit_failures.inc();
            warn!(error = %e, "offset commit failed; will commit again after the next flush");
        }
    }

    /// Progress rows (next offset, watermark) for the serving view's
    /// `as_of`, for partitions whose progress changed.
    fn publish_progress(&mut self) {
        for p in self.held.iter().copied().collect::<Vec<_>>() {
            let Some(s) = self.engine.status(p) else {
                continue;
            };
            let now = (s.next_offset, s.watermark, s.idle);
            if self.published.get(&p) == Some(&now) {
                continue;
            }
            self.published.insert(p, now);
            let rec = ProgressRecord {
                partition: p,
                next_offset: s.next_offset,
                watermark: s.watermark,
                idle: s.idle,
            };
            self.out.push(OutRecord {
                partition: None,
                topic: self.cfg.windows_topic.clone(),
                key: Some(ProgressRecord::key(p).into_bytes()),
                payload: serde_json::to_vec(&rec).ok(),
                headers: Vec::new(),
            });
        }
    }

    /// Per-flush metric updates.
    fn report(&mut self, started: Instant) {
        let m = &self.metrics;
        let c = std::mem::take(&mut self.unreported);
        let invalid: u64 = c.invalid.iter().sum();
        add(&self.stats.records, c.records);
        add(&self.stats.valid, c.valid);
        add(&self.stats.invalid, invalid);
        add(&self.stats.late, c.late);
        add(&self.stats.duplicates, c.duplicate);
        m.flush_duration.observe(started.elapsed().as_secs_f64());
        m.flush_records.observe(c.records as f64);
        m.records_consumed.inc_by(c.records);
        m.events.with_label_values(&["valid"]).inc_by(c.valid);
        m.events.with_label_values(&["late"]).inc_by(c.late);
        m.events
            .with_label_values(&["duplicate"])
            .inc_by(c.duplicate);
        m.events.with_label_values(&["invalid"]).inc_by(invalid);
        for (i, n) in c.invalid.iter().enumerate() {
            if *n > 0 {
                m.invalid_events
                    .with_label_values(&[Reason::ALL[i].as_str()])
                    .inc_by(*n);
            }
        }
        for (currency, micros) in &c.revenue {
            m.revenue
                .with_label_values(&[currency.as_str()])
                .inc_by(*micros as f64 / MICROS as f64);
        }
        for (kind, n) in self.engine.open_windows() {
            m.open_windows.with_label_values(&[kind]).set(n as i64);
        }
        let now = now_ms();
        for (p, s) in self.engine.partitions() {
            if let Some(wm) = s
                .watermark
                .filter(|w| *w > i64::MIN / 2 && *w < i64::MAX / 2)
            {
                let label = p.to_string();
                m.watermark
                    .with_label_values(&[&label])
                    .set(wm as f64 / 1000.0);
                m.watermark_delay
                    .with_label_values(&[&label])
                    .set((now - wm) as f64 / 1000.0);
            }
        }
    }

    /// Lag per held partition from the cached high watermarks (no request).
    fn update_lag(&self, consumer: &BaseConsumer<PodContext>) {
        let mut sum = 0i64;
        for p in &self.held {
            let Some(s) = self.engine.status(*p) else {
                continue;
            };
            let Some(high) = cached_high_watermark(consumer, &self.cfg.input_topic, *p) else {
                continue;
            };
            let lag = (high - s.next_offset).max(0);
            sum += lag;
            self.metrics
                .log_end_offset
                .with_label_values(&[&self.cfg.input_topic, &p.to_string()])
                .set(high);
            self.metrics
                .consumergroup_lag
                .with_label_values(&[&self.cfg.group, &self.cfg.input_topic, &p.to_string()])
                .set(lag);
        }
        self.metrics
            .consumergroup_lag_sum
            .with_label_values(&[&self.cfg.group, &self.cfg.input_topic])
            .set(sum);
        self.stats.lag.store(sum as u64, Ordering::Relaxed);
    }

    fn due(&self) -> bool {
        self.pending >= self.cfg.flush_max_events
            || self.retrying
            || self.last_flush.elapsed() >= Duration::from_millis(self.cfg.flush_interval_ms)
    }
}

/// The partition's high watermark as librdkafka last saw it in a fetch
/// response: no request, so it is cheap enough to read every tick.
fn cached_high_watermark(
    consumer: &BaseConsumer<PodContext>,
    topic: &str,
    p: Partition,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is live for the borrow of `consumer`, the
    // topic is a valid C string, and the two out-pointers are locals.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            p,
            &mut low,
            &mut high,
        )
    };

    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

fn base_record(rec: &OutRecord, opaque: usize) -> BaseRecord<'_, [u8], [u8], usize> {
    let mut r: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(&rec.topic, opaque);
    if let Some(p) = rec.partition {
        r = r.partition(p);
    }
    if let Some(k) = &rec.key {
        r = r.key(k.as_slice());
    }
    if let Some(p) = &rec.payload {
        r = r.payload(p.as_slice());
    }
    if !rec.headers.is_empty() {
        let mut h = OwnedHeaders::new();
        for (k, v) in &rec.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        r = r.headers(h);
    }
    r
}

/// Sends one record of `lane`, waiting out a full queue until `deadline`.
fn send(
    producer: &BaseProducer<AckContext>,
    rec: &OutRecord,
    lane: Lane,
    i: usize,
    deadline: Instant,
) -> Result<(), PodError> {
    loop {
        match producer.send(base_record(rec, lane.opaque(i))) {
            Ok(()) => {
                let mut acks = producer.context().lane(lane);
                if let Some(slot) = acks.status.get_mut(i) {
                    let was = std::mem::replace(slot, IN_FLIGHT);
                    if was == FAILED {
                        acks.failed -= 1;
                    }
                }
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if Instant::now() >= deadline {
                    return Err(PodError::ProduceTimeout(Duration::ZERO));
                }
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// The consumer's context: rebalance callbacks flush and restore.
pub struct PodContext {
    proc: Arc<Mutex<Processor>>,
    input_topic: String,
    stats: Arc<Stats>,
    callback_budget: Duration,
}

impl ClientContext for PodContext {}

impl ConsumerContext for PodContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        add(&self.stats.rebalances, 1);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<Partition> = tpl
            .elements_for_topic(&self.input_topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut proc = lock(&self.proc);
                proc.metrics.rebalances.with_label_values(&["assign"]).inc();
                for p in &partitions {
                    let offset = proc.begin_take(*p);
                    let _ = tpl.set_partition_offset(&self.input_topic, *p, offset);
                }
                drop(proc);
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    error!(error = %e, "assign failed");
                }
                // Nothing is fetched for these partitions until their
                // restore, in the main loop, is done.
                if let Err(e) = consumer.pause(tpl) {
                    error!(error = %e, "pause for restore failed");
                }
                self.stats.joined.store(true, Ordering::SeqCst);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut proc = lock(&self.proc);
                proc.metrics.rebalances.with_label_values(&["revoke"]).inc();
                // Bounded, so a rebalance never outlives max.poll.interval.ms.
                // If outputs cannot be acknowledged in time, the partition is
                // released without a commit: its next owner resumes from the
                // last committed (durable) offsets, so nothing is lost. The
                // drained changes stay pending and are written once their
                // outputs are acknowledged, keeping RocksDB consistent.
                if let Err(e) = proc.flush(consumer, self.callback_budget) {
                    warn!(error = %e, "flush on revoke did not finish in time; releasing without a commit");
                }
                for p in &partitions {
                    proc.release_partition(*p);
                }
                drop(proc);
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    error!(error = %e, "unassign failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

/// A running pod.
pub struct PodHandle {
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), PodError>>>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
}

impl PodHandle {
    /// Asks the loop to stop: final flush, commit, leave the group.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops and waits for the loop to end.
    pub fn join(mut self) -> Result<(), PodError> {
        self.stop();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| PodError::Panicked)?,
            None => Ok(()),
        }
    }
}

fn consumer_config(cfg: &PodConfig) -> Result<ClientConfig, PodError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", &cfg.assignment_strategy)
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        // A third of the session timeout, as Kafka recommends; librdkafka's
        // fixed 3 s default would expire short sessions between heartbeats.
        .set(
            "heartbeat.interval.ms",
            (cfg.session_timeout_ms / 3).max(100).to_string(),
        )
        .set("max.poll.interval.ms", cfg.max_poll_interval_ms.to_string())
        .set("enable.partition.eof", "false")
        // librdkafka's 500 ms default holds a fetch on a quiet partition that
        // long, which would dominate the freshness of window updates.
        .set("fetch.wait.max.ms", "10");
    if let Some(id) = &cfg.group_instance_id {
        c.set("group.instance.id", id);
    }
    for (k, v) in cfg.kafka_properties()? {
        c.set(k, v);
    }
    Ok(c)
}

fn producer_config(cfg: &PodConfig) -> Result<ClientConfig, PodError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        // Changelog rows of busy windows carry large customer sets; the
        // changelog topic allows records up to this size too.
        .set("message.max.bytes", "67108864")
        .set("message.timeout.ms", "30000");
    for (k, v) in cfg.kafka_properties()? {
        c.set(k, v);
    }
    Ok(c)
}

/// Starts a pod: checks the input topic, loads FX rates, opens the state
/// store, joins the group, and runs the loop on its own thread.
pub fn start(cfg: PodConfig) -> Result<PodHandle, PodError> {
    start_with_metrics(cfg, Arc::new(Metrics::new()))
}

/// [`start`], updating `metrics` (shared with the HTTP server).
pub fn start_with_metrics(cfg: PodConfig, metrics: Arc<Metrics>) -> Result<PodHandle, PodError> {
    cfg.validate()?;
    let core_cfg = cfg.core()?;
    let extra = cfg.kafka_properties()?;
    let probe: BaseConsumer = consumer_config(&cfg)?.create()?;
    let md = probe.fetch_metadata(Some(&cfg.input_topic), Duration::from_secs(10))?;
    let exists = md
        .topics()
        .iter()
        .any(|t| t.name() == cfg.input_topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Err(PodError::NoInputTopic(cfg.input_topic.clone()));
    }
    drop(probe);

    let defaults = fx::defaults(cfg.fx_defaults.as_deref())?;
    let (fx_table, follower) = fx::bootstrap(
        &cfg.brokers,
        &extra,
        &cfg.fx_topic,
        &defaults,
        Duration::from_secs(30),
    )?;
    info!(currencies = fx_table.len(), "FX table loaded");

    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| PodError::StateDir {
        dir: cfg.state_dir.display().to_string(),
        source,
    })?;
    let sizing = RocksSizing::detect(
        cfg.memory_limit_bytes,
        Path::new("/sys/fs/cgroup"),
        cfg.rocksdb_memory_fraction,
    );
    info!(
        limit_bytes = sizing.limit_bytes,
        source = ?sizing.source,
        block_cache_bytes = sizing.block_cache_bytes,
        write_buffer_bytes = sizing.write_buffer_bytes,
        "RocksDB memory sized from the memory limit"
    );
    let store = Store::open(&cfg.state_dir, core_cfg.state_fingerprint(), &sizing)?;
    let engine =
        Engine::new(core_cfg, fx_table).map_err(|e| crate::config::ConfigError::Invalid {
            field: e.field,
            message: e.message,
        })?;
    let producer: BaseProducer<AckContext> =
        producer_config(&cfg)?.create_with_context(AckContext {
            lanes: Default::default(),
            changelog_topic: cfg.changelog_topic.clone(),
            changelog_max: Mutex::new(HashMap::new()),
        })?;
    let stats = Arc::new(Stats::default());
    let processor = Arc::new(Mutex::new(Processor {
        input_topic: Arc::from(cfg.input_topic.as_str()),
        cfg: cfg.clone(),
        engine,
        store,
        producer,
        out: Vec::new(),
        out_offered: 0,
        send_blocked: false,
        retrying: false,
        changelog_out: Vec::new(),
        outputs_acked: false,
        pending_changes: None,
        effects: Vec::new(),
        pending: 0,
        last_flush: Instant::now(),
        held: BTreeSet::new(),
        stats: stats.clone(),
        fx_follower: Some(follower),
        metrics: metrics.clone(),
        unreported: Counts::default(),
        published: HashMap::new(),
        restoring: BTreeMap::new(),
        fetch_paused: false,
    }));
    let ctx = PodContext {
        proc: processor.clone(),
        input_topic: cfg.input_topic.clone(),
        stats: stats.clone(),
        callback_budget: Duration::from_millis(cfg.max_poll_interval_ms / 3),
    };
    let consumer: BaseConsumer<PodContext> = consumer_config(&cfg)?.create_with_context(ctx)?;
    consumer.subscribe(&[&cfg.input_topic])?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let thread = {
        let (shutdown, processor) = (shutdown.clone(), processor.clone());
        std::thread::Builder::new()
            .name("tally-pod".into())
            .spawn(move || run_loop(consumer, processor, shutdown, cfg))
            .map_err(|e| PodError::Kafka(KafkaError::ClientCreation(e.to_string())))?
    };
    Ok(PodHandle {
        shutdown,
        thread: Some(thread),
        stats,
        metrics,
    })
}

fn run_loop(
    consumer: BaseConsumer<PodContext>,
    processor: Arc<Mutex<Processor>>,
    shutdown: Arc<AtomicBool>,
    cfg: PodConfig,
) -> Result<(), PodError> {
    info!(topic = %cfg.input_topic, group = %cfg.group, "pod running");
    let flush_budget = Duration::from_millis((cfg.max_poll_interval_ms / 3).min(10_000));
    let mut last_tick = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        // Never poll while holding the processor: a poll may run a rebalance
        // callback, which takes the processor itself (a std Mutex is not
        // reentrant). So each record takes the lock on its own; uncontended,
        // that costs nanoseconds next to the record's processing.
        let mut wait = Duration::from_millis(20);
        for _ in 0..1024 {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    let mut proc = lock(&processor);
                    proc.on_message(
                        m.partition(),
                        m.offset(),
                        m.key(),
                        m.payload().unwrap_or_default(),
                    );
                    if proc.pending >= cfg.flush_max_events {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "consume error");
                    break;
                }
                None => break,
            }
            // Drain what is already fetched without waiting.
            wait = Duration::ZERO;
        }
        let mut proc = lock(&processor);
        // Serve the delivery reports of the outputs sent so far.
        proc.producer.poll(Duration::ZERO);
        if !proc.restoring.is_empty() {
            proc.restore_step(&consumer, Duration::from_millis(50));
        }
        if last_tick.elapsed() >= Duration::from_millis(500) {
            proc.tick();
            proc.update_lag(&consumer);
            last_tick = Instant::now();
        }
        if proc.due() {
            match proc.flush(&consumer, flush_budget) {
                Ok(()) => {
                    if proc.fetch_paused {
                        // Not the partitions still restoring: they resume
                        // when their restore is done.
                        if let Ok(a) = consumer.assignment() {
                            let mut tpl = TopicPartitionList::new();
                            for e in a.elements() {
                                if !proc.restoring.contains_key(&e.partition()) {
                                    tpl.add_partition(e.topic(), e.partition());
                                }
                            }
                            let _ = consumer.resume(&tpl);
                        }
                        proc.fetch_paused = false;
                        info!("outputs acknowledged again; consumption resumed");
                    }
                }
                Err(PodError::ProduceTimeout(_)) => {
                    // Keep polling (the group must see us alive) but stop
                    // fetching until the outputs are acknowledged.
                    if !proc.fetch_paused {
                        if let Ok(a) = consumer.assignment() {
                            let _ = consumer.pause(&a);
                        }
                        proc.fetch_paused = true;
                        warn!("outputs not acknowledged; consumption paused until they are");
                    }
                }
                Err(e) => {
                    error!(error = %e, "flush failed");
                    return Err(e);
                }
            }
        }
    }
    info!("shutting down: final flush and commit");
    let deadline = Instant::now() + Duration::from_millis(cfg.shutdown_timeout_ms);
    let mut proc = lock(&processor);
    proc.tick();
    loop {
        match proc.flush(
            &consumer,
            deadline.saturating_duration_since(Instant::now()),
        ) {
            Ok(()) => break,
            Err(PodError::ProduceTimeout(_)) if Instant::now() < deadline => continue,
            Err(e) => {
                warn!(error = %e, "final flush failed; the next owner redoes the work from the last durable offsets");
                proc.retrying = false;
                proc.clear_batch();
                proc.outputs_acked = false;
                proc.pending_changes = None;
                break;
            }
        }
    }
    drop(proc);
    // Dropping the consumer closes it: the group sees us leave at once.
    drop(consumer);
    info!("pod stopped");
    Ok(())
}
