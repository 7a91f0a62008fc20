//! Feeds the serving [`View`] from `revenue-windows` (all partitions, from
//! the beginning, then following). The view is `caught_up` once it has read
//! every partition to the end offsets seen at start; until then the HTTP
//! layer answers data requests with 503 and `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use crate::kafka::Clients;
use crate::telemetry::metrics::Metrics;
use tally_core::view::View;

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
}

pub struct ViewFollower {
    pub view: Arc<RwLock<View>>,
    pub caught_up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ViewFollower {
    /// Stops the follower and waits for its thread, so its consumer is
    /// closed when this returns (dropping only asks it to stop).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ViewFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Follows `topic` (`revenue-windows`) into a new view of `core`'s window
/// definitions; `input_topic`'s partition count is how many partitions
/// must vouch for a window before it is final.
pub fn follow(
    brokers: &str,
    extra: &[(String, String)],
    topic: &str,
    input_topic: &str,
    core: &tally_core::CoreConfig,
    metrics: Arc<Metrics>,
) -> Result<ViewFollower, ServingError> {
    let mut view = View::new(core.grace_ms);
    view.set_definitions(core.windows.clone());
    view.set_retention(core.window_retention_ms);
    let view = Arc::new(RwLock::new(view));
    follow_into(
        brokers,
        extra,
        (topic, input_topic),
        view,
        Arc::new(AtomicBool::new(false)),
        metrics,
    )
}

/// [`follow`], into a view and a caught-up flag the caller already
/// serves: `tally run` answers `/readyz` (not ready, and why) while its
/// start-up still waits for the broker.
pub fn follow_into(
    brokers: &str,
    extra: &[(String, String)],
    (topic, input_topic): (&str, &str),
    view: Arc<RwLock<View>>,
    caught_up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> Result<ViewFollower, ServingError> {
    let consumer: BaseConsumer = Clients::new(brokers, extra).reader("tally-view").create()?;
    // A leader moving or a slow broker at start must not stop the process
    // (the soak test saw `tally run` exit on NotLeaderForPartition here):
    // transient errors are retried with back-off for up to two minutes.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut backoff = crate::kafka::Backoff::default();
    let (tpl, ends) = loop {
        match positions(&consumer, (topic, input_topic), &view) {
            Ok(found) => break found,
            Err(ServingError::Kafka(e))
                if crate::kafka::is_transient(&e) && std::time::Instant::now() < deadline =>
            {
                let wait = backoff.next_delay();
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "reading revenue-windows' metadata: transient broker error; retrying");
                std::thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    };
    consumer.assign(&tpl)?;
    caught_up.store(ends.is_empty(), Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (view, caught_up, stop) = (view.clone(), caught_up.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tally-view".into())
            .spawn(move || run(consumer, view, caught_up, stop, ends, metrics))
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?
    };
    Ok(ViewFollower {
        view,
        caught_up,
        stop,
        thread: Some(thread),
    })
}

/// The view's partition count and where to read `revenue-windows` from:
/// every partition from its beginning, and the end offsets seen now.
fn positions(
    consumer: &BaseConsumer,
    (topic, input_topic): (&str, &str),
    view: &RwLock<View>,
) -> Result<(TopicPartitionList, HashMap<i32, i64>), ServingError> {
    // Every partition of the input must vouch for a window before it is
    // final: the count comes from the metadata, not from who published.
    let md = consumer.fetch_metadata(Some(input_topic), Duration::from_secs(10))?;
    let inputs = md
        .topics()
        .iter()
        .filter(|t| t.name() == input_topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .next()
        .filter(|n| *n > 0)
        .ok_or_else(|| ServingError::NoTopic(input_topic.to_string()))?;
    if let Ok(mut v) = view.write() {
        v.set_input_partitions(inputs);
    }
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        return Err(ServingError::NoTopic(topic.to_string()));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        if high > low {
            ends.insert(*p, high);
        }
    }
    Ok((tpl, ends))
}

fn run(
    consumer: BaseConsumer,
    view: Arc<RwLock<View>>,
    caught_up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    mut ends: HashMap<i32, i64>,
    metrics: Arc<Metrics>,
) {
    // Decoded as each record is read (from the fetched bytes, no copy),
    // outside the lock; readers only wait for the map updates. Reused, so
    // a batch's updates do not take fresh memory each time (copying each
    // batch's bytes into a new vector of updates cost a third of this
    // thread in page faults and copies).
    let mut parsed = Vec::with_capacity(512);
    while !stop.load(Ordering::SeqCst) {
        let mut first = consumer.poll(Duration::from_millis(50));
        while let Some(r) = first.take().or_else(|| {
            if parsed.len() < 512 {
                consumer.poll(Duration::ZERO)
            } else {
                None
            }
        }) {
            match r {
                Ok(m) => {
                    if ends
                        .get(&m.partition())
                        .is_some_and(|end| m.offset() + 1 >= *end)
                    {
                        ends.remove(&m.partition());
                    }
                    parsed.push(crate::wire::windows::decode(
                        m.key().unwrap_or_default(),
                        m.payload(),
                    ));
                }
                Err(e) => warn!(error = %e, "revenue-windows consume error"),
            }
        }
        if !parsed.is_empty() {
            let records = parsed.len() as u64;
            let mut invalid = 0;
            if let Ok(mut v) = view.write() {
                for p in parsed.drain(..) {
                    match p {
                        Ok(update) => v.apply(update),
                        Err(e) => {
                            invalid += 1;
                            warn!(error = %e, "ignoring a revenue-windows record");
                        }
                    }
                }
            }
            parsed.clear();
            metrics.view_records.inc_by(records);
            metrics.view_invalid_records.inc_by(invalid);
        }
        if !ends.is_empty() {
            // Compaction may have removed the last offsets: the position
            // (next offset to fetch) says we are past them too.
            if let Ok(pos) = consumer.position() {
                for e in pos.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        if ends.get(&e.partition()).is_some_and(|end| o >= *end) {
                            ends.remove(&e.partition());
                        }
                    }
                }
            }
        }
        if ends.is_empty() && !caught_up.load(Ordering::Relaxed) {
            caught_up.store(true, Ordering::SeqCst);
        }
    }
}
