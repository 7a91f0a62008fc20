//! The consumer pod: Kafka in, the core in the middle, outputs and RocksDB out.
//!
//! **Guarantee.** Window results are exact (no order lost or counted twice)
//! across crashes and rebalances; output topics are at-least-once. This
//! holds because of the flush order, which `tally_core::cycle::Cycle` decides
//! and this module only performs:
//! 1. produce every output of the micro-batch and wait for all acks
//!    (idempotent producer, `acks=all`);
//! 2. produce the changed rows to the changelog, group by group, waiting
//!    for every ack;
//! 3. write the rows and the partition meta (next offset, watermark) to
//!    RocksDB in one synced batch;
//! 4. commit the offsets to Kafka.
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
//!
//! - `run`: start-up (with retries of transient broker errors), the poll
//!   loop, [`PodHandle`].
//! - `process`: records and ticks through the engine, effects into output
//!   records registered with the cycle, per-flush reports.
//! - `flush`: performs the cycle's actions (send, write, commit, durable,
//!   purge, forget).
//! - `acks`: queues the producer's delivery reports for the cycle.
//! - `restore`: changelog → RocksDB → engine, outside the rebalance
//!   callback, retrying transient errors.
//! - `rebalance`: the consumer context (assign, revoke) and releasing a
//!   partition.
//! - `claim`: ownership epochs: the claim a new owner writes on the
//!   changelog, the epoch every record it writes carries.

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
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, info_span, trace_span, warn};

use crate::config::PodConfig;
use crate::fx::{self, FxFollower};
use crate::kafka::Clients;
use crate::state::codec::{encode, CodecError, Encoded};
use crate::state::store::{Store, StoreError, StoreReader};
use crate::telemetry::memory::RocksSizing;
use crate::telemetry::metrics::{GaugeShares, Metrics};
use crate::wire::{OutRecord, Outputs, Source};
use tally_core::cycle::{Action, BatchId, Cycle, Lane, Tag};
use tally_core::order::MICROS;
use tally_core::view::ProgressRecord;
use tally_core::{Currency, Effect, Engine, Partition, Readable, Reason, StateChange, StateRow};

mod acks;
mod claim;
mod flush;
mod process;
mod rebalance;
mod restore;
mod resume;
mod run;

use acks::{AckContext, Report};
use flush::Sealed;
pub use rebalance::PodContext;
use restore::Restoring;
use resume::{Resume, Step};
pub use run::{
    consumer_config, producer_config, start, start_threads, start_with_metrics, start_with_stats,
    stop_all, PodHandle,
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("FX rates: {0}")]
    Fx(#[from] fx::FxError),
    #[error("input topic {0} does not exist (create it, or run `tally topics apply`)")]
    NoInputTopic(String),
    #[error(
        "changelog topic {changelog} has {changelog_partitions} partitions, fewer than the \
         {input_partitions} of the input topic {input}: partition p's state goes to changelog \
         partition p, so it needs at least as many (add partitions, or recreate it with `tally topics apply`)"
    )]
    ChangelogPartitions {
        changelog: String,
        changelog_partitions: usize,
        input: String,
        input_partitions: usize,
    },
    #[error("changelog topic {0} does not exist (create it, or run `tally topics apply`)")]
    NoChangelogTopic(String),
    #[error("window results topic {0} does not exist (create it, or run `tally topics apply`)")]
    NoWindowsTopic(String),
    #[error("outputs were not acknowledged within {0:?}")]
    ProduceTimeout(Duration),
    #[error("cannot create the state directory {dir}: {source}")]
    StateDir { dir: String, source: std::io::Error },
    #[error("the pod thread panicked")]
    Panicked,
    #[error("flush cycle: {0}")]
    Cycle(String),
    #[error("start-up interrupted by a shutdown request")]
    Interrupted,
    #[error(
        "changelog {topic} partition {partition} starts at offset {low}, after offset {needed} \
         where this restore has to begin: records were deleted (retention or delete-records on \
         a topic that must only be compacted), so the partition's state cannot be restored from it"
    )]
    ChangelogTruncated {
        topic: String,
        partition: Partition,
        needed: i64,
        low: i64,
    },
    #[error(
        "partition {partition}: the changelog seems to start at offset {low}, after offset \
         {needed} where this restore has to begin; asking again before believing it"
    )]
    ChangelogStartUnconfirmed {
        partition: Partition,
        needed: i64,
        low: i64,
    },
    #[error(
        "partition {partition}: the changelog after the local checkpoint holds records of \
         ownership epoch {found} whose claim comes before it (the local state's epoch is \
         {stored}): this pod wrote on after it was replaced"
    )]
    LocalStateStale {
        partition: Partition,
        stored: u64,
        found: u64,
    },
    #[error(
        "partition {partition}: the changelog's rows were written under other window \
         definitions (fingerprint {found:016x}; this pod's are {ours:016x}), and rows are \
         keyed by a definition's position: restoring them would count one window's orders \
         in another. Run new definitions under a new --group and --changelog-topic \
         (docs/operations.md, \"Upgrades\")"
    )]
    OtherDefinitions {
        partition: Partition,
        found: u64,
        ours: u64,
    },
}

/// What the pod's readiness and its callers ask of it. The counts are
/// read from the pod's Prometheus metrics, the one source of every counter
/// (`telemetry::metrics`), updated once per flush; this keeps only the state
/// that is not a counter.
pub struct Stats {
    metrics: Arc<Metrics>,
    /// Set once the group has given this pod an assignment (possibly empty).
    pub joined: AtomicBool,
    /// Consumer lag summed over the held partitions, at the last check.
    pub lag: AtomicU64,
    /// Partitions this pod (engine thread) holds: restored and processing.
    pub held: Mutex<Vec<Partition>>,
    /// Assigned partitions still restoring: the pod is not ready for them.
    pub restoring: Mutex<Vec<Partition>>,
    /// Assigned partitions the pod refuses to process, and why (a rebuild
    /// that would lose orders): the pod is not ready while any is.
    pub blocked: Mutex<Vec<(Partition, String)>>,
    /// While start-up retries a broker error: what it is waiting for.
    pub starting: Mutex<Option<String>>,
    /// A shutdown was asked for while starting: start-up stops retrying.
    interrupted: AtomicBool,
    /// Why the engine thread stopped with an error: neither live nor
    /// ready from then on, while the process winds down.
    pub failed: Mutex<Option<String>>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("records", &self.records())
            .field("flushes", &self.flushes())
            .field("joined", &self.joined)
            .field("lag", &self.lag)
            .finish()
    }
}

impl Stats {
    pub fn new(metrics: Arc<Metrics>) -> Stats {
        Stats {
            metrics,
            joined: AtomicBool::new(false),
            lag: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            restoring: Mutex::new(Vec::new()),
            blocked: Mutex::new(Vec::new()),
            starting: Mutex::new(None),
            interrupted: AtomicBool::new(false),
            failed: Mutex::new(None),
        }
    }

    /// Records that the engine thread failed, and why.
    pub fn fail(&self, why: String) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(why);
        }
    }

    /// Why the engine thread failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Asks a start-up that is retrying a broker error to give up
    /// ([`PodError::Interrupted`]) instead of retrying on.
    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }

    fn outcome(&self, o: &str) -> u64 {
        self.metrics.events.with_label_values(&[o]).get()
    }

    /// Input records consumed (`tally_records_consumed_total`).
    pub fn records(&self) -> u64 {
        self.metrics.records_consumed.get()
    }
    pub fn valid(&self) -> u64 {
        self.outcome("valid")
    }
    pub fn invalid(&self) -> u64 {
        self.outcome("invalid")
    }
    pub fn late(&self) -> u64 {
        self.outcome("late")
    }
    pub fn duplicates(&self) -> u64 {
        self.outcome("duplicate")
    }
    /// Flushes completed (the count of `tally_flush_duration_seconds`).
    pub fn flushes(&self) -> u64 {
        self.metrics.flush_duration.get_sample_count()
    }
    pub fn flush_failures(&self) -> u64 {
        self.metrics.flush_failures.get()
    }
    pub fn commit_failures(&self) -> u64 {
        self.metrics.commit_failures.get()
    }
    /// Assign and revoke callbacks.
    pub fn rebalances(&self) -> u64 {
        ["assign", "revoke"]
            .iter()
            .map(|k| self.metrics.rebalances.with_label_values(&[k]).get())
            .sum()
    }
    /// State rows restored from the changelog (`tally_restore_records_total`).
    pub fn restored_rows(&self) -> u64 {
        self.metrics.restore_records.get()
    }
}

impl PodError {
    /// A broker error that goes away by itself (a leader moving, a
    /// timeout, brokers briefly down): retried, never fatal at start-up.
    pub fn is_transient(&self) -> bool {
        match self {
            PodError::Kafka(e) | PodError::Fx(fx::FxError::Kafka(e)) => {
                crate::kafka::is_transient(e)
            }
            PodError::ChangelogStartUnconfirmed { .. } => true,
            _ => false,
        }
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Everything the loop and the rebalance callbacks share.
pub struct Processor {
    cfg: PodConfig,
    /// The client factory: the restore readers are made with it.
    clients: Clients,
    /// `cfg.topics.input_topic`, shared: lent to every output record's source.
    input_topic: Arc<str>,
    engine: Engine,
    store: Store,
    producer: BaseProducer<AckContext>,
    /// The flush cycle and partition ownership (pure): which record of
    /// which batch is where, and what to do next.
    cycle: Cycle,
    /// Outputs of the batch being collected, by the cycle's tag index.
    out: Vec<OutRecord>,
    /// The batch in flight (sealed), with its records' bytes.
    sealed: Option<Sealed>,
    /// Delivery reports taken from the producer's context (reused buffer).
    reports: Vec<Report>,
    effects: Vec<Effect>,
    pending: usize,
    last_flush: Instant,
    /// When open window results were last emitted: at a seal, or by an
    /// announcement while a flush is in flight ([`Processor::announce`]).
    last_emit: Instant,
    held: BTreeSet<Partition>,
    stats: Arc<Stats>,
    fx_follower: Option<FxFollower>,
    metrics: Arc<Metrics>,
    /// Counts not yet added to the Prometheus counters (updated per flush).
    unreported: Counts,
    /// This engine thread's part of the pod-wide gauges.
    shares: GaugeShares,
    /// The dedup cache's counters as last exported.
    reported_cache: tally_core::CacheStats,
    /// The progress last published per partition.
    published: HashMap<Partition, (i64, Option<i64>, bool)>,
    /// Assigned partitions whose state is being restored, in order; their
    /// fetches are paused meanwhile.
    restoring: BTreeMap<Partition, Restoring>,
    /// The changelog readers of the restores under way (none when nothing
    /// is restoring).
    restore_clients: Option<restore::RestoreClients>,
    /// Fetching is paused for every partition (outputs unacknowledged).
    fetch_paused: bool,
    /// Restored partitions waiting for their seek to the resume offset
    /// (paused until it succeeds).
    seeks: BTreeMap<Partition, Offset>,
    /// Restored partitions whose first record after the seek to their
    /// resume offset has not come yet (`resume`).
    resumes: HashMap<Partition, resume::Resume>,
    /// Assigned partitions left paused: their rebuild was refused.
    refused: BTreeSet<Partition>,
    /// This pod's ownership epoch of each partition it has claimed.
    epochs: HashMap<Partition, u64>,
    /// Writes the claims of new ownership epochs.
    claims: claim::Claims,
    /// `revenue-windows`' partition count (rows of input partition `p` go
    /// to partition `p mod n`).
    windows_partitions: i32,
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

/// Drops a partition's local state that cannot be trusted, counting why
/// (`tally_local_state_discarded_total{reason}`): its next restore reads
/// the changelog in full. A function of the two fields, not a method, so
/// restore can call it while it holds the partition's restore entry.
pub(super) fn discard_local_state(
    metrics: &Metrics,
    store: &Store,
    p: Partition,
    reason: &str,
) -> Result<(), StoreError> {
    metrics
        .local_state_discarded
        .with_label_values(&[reason])
        .inc();
    store.clear_partition(p)
}
