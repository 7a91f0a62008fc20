//! Kafka helpers for the pod's integration tests (no sleeps: everything
//! waits by polling against a deadline).
//!
//! The tests run against librdkafka's mock cluster, in-process, or, when
//! `TALLY_TEST_BROKERS` is set, against that external Kafka-compatible
//! broker. There, every topic and group name gets a prefix unique to the
//! test process, so runs never see each other's data: the helpers here take
//! the plain names ("raw-orders") and apply it, and [`topic`] and [`group`]
//! apply it where a test names a topic to the library itself.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tally::config::PodConfig;
use tally::gen::{Expect, GenRecord};
use tally::wire::WindowRecord;
use tally_core::window::{assign, tumbling_start};
use tally_core::{WindowKind, WindowSpec};

/// The external broker under test, if any (`TALLY_TEST_BROKERS`).
pub fn external_brokers() -> Option<String> {
    std::env::var("TALLY_TEST_BROKERS")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// The prefix of every topic and group name on the external broker: new
/// for each [`TestBroker`], so no test reads another's records. The
/// scripts that run the suite against an external broker run its tests
/// one at a time (`--test-threads=1`), so the current prefix is the
/// running test's, in its helper threads too.
static PREFIX: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn prefix() -> String {
    if external_brokers().is_none() {
        return String::new();
    }
    let mut p = PREFIX.lock().unwrap_or_else(|e| e.into_inner());
    if p.is_empty() {
        *p = new_prefix();
    }
    p.clone()
}

fn new_prefix() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("it{}x{}n{n}-", std::process::id(), tally::pod::now_ms())
}

/// The name a topic of the declarations has on the broker under test.
pub fn topic(name: &str) -> String {
    format!("{}{name}", prefix())
}

/// Sends `records` to the broker under test's `raw-orders`, unpaced, and
/// waits for every acknowledgement.
pub fn produce_input(brokers: &str, records: &[tally::gen::GenRecord]) {
    tally::gen::produce(brokers, &topic("raw-orders"), &[], records, 0.0, &|| false)
        .expect("the input is produced");
}

/// The first `n` valid orders of `records`, to be sent again: each is
/// expected back as a duplicate of itself.
pub fn resent(records: &[tally::gen::GenRecord], n: usize) -> Vec<tally::gen::GenRecord> {
    use tally::gen::{Expect, GenRecord};
    records
        .iter()
        .filter_map(|r| match &r.expect {
            Expect::Valid { order_id, .. } => Some(GenRecord {
                key: r.key.clone(),
                payload: r.payload.clone(),
                expect: Expect::Duplicate {
                    order_id: order_id.clone(),
                },
            }),
            _ => None,
        })
        .take(n)
        .collect()
}

/// The name of a consumer group on the broker under test.
pub fn group(name: &str) -> String {
    format!("{}{name}", prefix())
}

/// Skips the calling test on the external broker, saying why; a test calls
/// it when it needs what only the mock cluster has (fault injection), or
/// what the external broker is known not to do.
pub fn skip_on_external(reason: &str) -> bool {
    match external_brokers() {
        Some(b) => {
            eprintln!("SKIPPED on the external broker {b}: {reason}");
            true
        }
        None => false,
    }
}

/// Whether the external broker is tansu (`TALLY_TEST_BROKER_KIND=tansu`).
pub fn on_tansu() -> bool {
    external_brokers().is_some()
        && std::env::var("TALLY_TEST_BROKER_KIND").is_ok_and(|k| k == "tansu")
}

/// Whether the external broker is Apache Kafka (`TALLY_TEST_BROKER_KIND=kafka`).
pub fn on_kafka() -> bool {
    external_brokers().is_some()
        && std::env::var("TALLY_TEST_BROKER_KIND").is_ok_and(|k| k == "kafka")
}

/// Skips the calling test when the external broker is tansu
/// (`TALLY_TEST_BROKER_KIND=tansu`), for one of its known gaps.
pub fn skip_on_tansu(reason: &str) -> bool {
    let tansu = on_tansu();
    if tansu {
        eprintln!("SKIPPED on tansu: {reason}");
    }
    tansu
}

/// The repository's topic declarations (`topics/`).
pub fn declared_topics() -> Vec<tally::kafka::topics::TopicSpec> {
    tally::kafka::topics::load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topics"))
        .expect("topics/ loads")
}

/// Runs a pod on `cfg` until the group has committed all of the input,
/// then stops it.
pub fn run_to_the_end(brokers: &str, group_name: &str, cfg: &tally::config::PodConfig, what: &str) {
    let pod = tally::pod::start(cfg.clone()).unwrap();
    wait_all_committed(brokers, group_name, what, Duration::from_secs(60));
    pod.join().unwrap();
}

/// Waits until `group` has committed every offset of `raw-orders` that
/// exists now (the input is fully processed and durable).
pub fn wait_all_committed(brokers: &str, group: &str, what: &str, timeout: Duration) {
    let ends = end_offsets(brokers, "raw-orders");
    wait_until(what, timeout, || {
        committed(brokers, group, "raw-orders") == ends
    });
}

/// The broker under test, with the declared topics created.
pub struct TestBroker {
    mock: Option<tally::kafka::broker::EmbeddedBroker>,
    brokers: String,
}

impl TestBroker {
    /// A mock cluster of `n` brokers, or the external broker, with `specs`
    /// (plain names) created.
    pub fn start(n: i32, specs: &[tally::kafka::topics::TopicSpec]) -> TestBroker {
        let Some(brokers) = external_brokers() else {
            let mock = tally::kafka::broker::EmbeddedBroker::start(n, specs).unwrap();
            return TestBroker {
                brokers: mock.bootstrap_servers(),
                mock: Some(mock),
            };
        };
        *PREFIX.lock().unwrap_or_else(|e| e.into_inner()) = new_prefix();
        let renamed: Vec<_> = specs
            .iter()
            .cloned()
            .map(|mut s| {
                s.name = topic(&s.name);
                s
            })
            .collect();
        tally::kafka::topics::apply_blocking(&brokers, &[], &renamed)
            .unwrap_or_else(|e| panic!("creating the test topics on {brokers}: {e}"));
        // Wait until the broker knows every partition of every topic.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        wait_until("the test topics to exist", Duration::from_secs(30), || {
            renamed.iter().all(|s| {
                consumer
                    .fetch_metadata(Some(&s.name), Duration::from_secs(5))
                    .is_ok_and(|md| {
                        md.topics().first().is_some_and(|t| {
                            t.error().is_none() && t.partitions().len() == s.partitions as usize
                        })
                    })
            })
        });
        TestBroker {
            mock: None,
            brokers,
        }
    }

    pub fn bootstrap_servers(&self) -> String {
        self.brokers.clone()
    }

    /// The mock cluster, for fault injection; `None` on an external broker.
    pub fn mock(&self) -> Option<&tally::kafka::broker::EmbeddedBroker> {
        self.mock.as_ref()
    }
}

/// `tally run`'s flags naming every topic, for child processes.
pub fn topic_args() -> Vec<String> {
    [
        ("--input-topic", "raw-orders"),
        ("--enriched-topic", "enriched-orders"),
        ("--dlq-topic", "orders-dlq"),
        ("--late-topic", "orders-late"),
        ("--windows-topic", "revenue-windows"),
        ("--fx-topic", "fx-rates"),
        ("--alerts-topic", "order-alerts"),
        ("--changelog-topic", "tally-changelog"),
    ]
    .iter()
    .flat_map(|(flag, name)| [flag.to_string(), topic(name)])
    .collect()
}

pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Every record of `topic`, read from the beginning to the high watermark.
pub fn read_all(brokers: &str, name: &str) -> Vec<Rec> {
    let topic = &topic(name);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tally-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in &partitions(&consumer, topic) {
        let (lo, hi) = watermarks(&consumer, brokers, topic, *p);
        if hi > lo {
            tpl.add_partition_offset(topic, *p, Offset::Offset(lo))
                .unwrap();
            ends.insert(*p, hi);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let mut pos: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ends
        .iter()
        .any(|(p, hi)| pos.get(p).copied().unwrap_or(-1) + 1 < *hi)
    {
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            pos.insert(m.partition(), m.offset());
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    headers.insert(
                        hd.key.to_string(),
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Rec {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}

/// The low and high watermarks of a partition (`topic` as on the broker).
///
/// tansu's high watermark undercounts: it is one past the first
/// offset of the last record batch, not of its last record. So on an
/// external broker the last batch is read from there and its last record
/// gives the true end; on a correct broker that batch is the last record
/// itself, and the answer is the same.
fn watermarks(consumer: &BaseConsumer, brokers: &str, topic: &str, p: i32) -> (i64, i64) {
    // Retried: fault tests inject ListOffsets errors meant for the pod, and
    // this reader may draw some of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (lo, hi) = loop {
        match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
            Ok(w) => break w,
            Err(e) if Instant::now() < deadline => {
                eprintln!("watermarks of {topic}/{p}: {e}; asking again");
            }
            Err(e) => panic!("watermarks of {topic}/{p}: {e}"),
        }
    };
    if external_brokers().is_none() || hi <= lo {
        return (lo, hi);
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tally-test-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(hi - 1))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    // The batch arrives in one fetch response: once its first record is
    // here, the rest are queued behind it.
    while last.is_none() {
        assert!(
            Instant::now() < deadline,
            "cannot read {topic}/{p} at {}",
            hi - 1
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            last = Some(m.offset());
        }
    }
    while let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
        last = Some(m.offset());
    }
    (lo, last.map_or(hi, |o| o + 1).max(hi))
}

/// The partition ids of `topic` (as on the broker).
fn partitions(consumer: &BaseConsumer, topic: &str) -> Vec<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()[0].partitions().iter().map(|p| p.id()).collect()
}

/// (low, high) watermarks of every partition of `topic`.
fn all_watermarks(brokers: &str, name: &str) -> BTreeMap<i32, (i64, i64)> {
    let topic = &topic(name);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    partitions(&consumer, topic)
        .into_iter()
        .map(|p| (p, watermarks(&consumer, brokers, topic, p)))
        .collect()
}

/// High watermark of every partition of `topic`.
pub fn end_offsets(brokers: &str, name: &str) -> BTreeMap<i32, i64> {
    all_watermarks(brokers, name)
        .into_iter()
        .map(|(p, (_, hi))| (p, hi))
        .collect()
}

/// Low watermark (log start) of every partition of `topic`.
pub fn start_offsets(brokers: &str, name: &str) -> BTreeMap<i32, i64> {
    all_watermarks(brokers, name)
        .into_iter()
        .map(|(p, (lo, _))| (p, lo))
        .collect()
}

/// The group's committed offsets for `topic`.
pub fn committed(brokers: &str, group_name: &str, name: &str) -> BTreeMap<i32, i64> {
    let (topic, group) = (&topic(name), &group(group_name));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in partitions(&consumer, topic) {
        tpl.add_partition(topic, p);
    }
    let c = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(_) => return BTreeMap::new(),
    };
    c.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tally-it-{name}-{}-{}",
        std::process::id(),
        tally::pod::now_ms()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A pod config for tests: short session timeout, quick flushes.
pub fn pod_config(brokers: &str, group_name: &str, state_dir: PathBuf) -> PodConfig {
    let mut c = PodConfig::from_env_and_defaults().expect("defaults");
    c.kafka.brokers = brokers.to_string();
    c.kafka.group = group(group_name);
    c.prefix_topics(&prefix());
    c.resources.state_dir = state_dir;
    c.topics.apply_topics = false;
    c.kafka.session_timeout_ms = 6_000;
    c.flush.flush_interval_ms = 50;
    c.serving.http = "127.0.0.1:0".into();
    c
}

pub type Totals = BTreeMap<(String, String, i64), (u64, i128)>;

/// Expected (count, USD micros) per (window definition, group, start) for
/// the default windows, from the generator's truth.
pub fn truth_totals(records: &[GenRecord]) -> Totals {
    let mut t: Totals = BTreeMap::new();
    let mut sessions: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for r in records {
        let Expect::Valid {
            currency,
            region,
            customer_id,
            usd_micros,
            created_at_ms,
            ..
        } = &r.expect
        else {
            continue;
        };
        for spec in WindowSpec::defaults() {
            let group = match spec.by {
                tally_core::GroupBy::Currency => currency.clone(),
                tally_core::GroupBy::Region => region.clone(),
                tally_core::GroupBy::Customer => customer_id.clone(),
            };
            match spec.kind {
                WindowKind::Session { .. } => sessions
                    .entry(customer_id.clone())
                    .or_default()
                    .push((*created_at_ms, *usd_micros)),
                k => {
                    for (start, _) in assign(&k, *created_at_ms) {
                        let e = t
                            .entry((spec.name.clone(), group.clone(), start))
                            .or_default();
                        e.0 += 1;
                        e.1 += i128::from(*usd_micros);
                    }
                }
            }
        }
    }
    let gap = 1_800_000;
    for (c, mut evs) in sessions {
        evs.sort();
        let mut cur: Option<(i64, i64, u64, i128)> = None;
        for (t0, usd) in evs {
            cur = match cur {
                Some((s, last, n, sum)) if t0 - last < gap => {
                    Some((s, t0, n + 1, sum + i128::from(usd)))
                }
                Some((s, _, n, sum)) => {
                    t.insert(("session_30m_customer".into(), c.clone(), s), (n, sum));
                    Some((t0, t0, 1, i128::from(usd)))
                }
                None => Some((t0, t0, 1, i128::from(usd))),
            };
        }
        if let Some((s, _, n, sum)) = cur {
            t.insert(("session_30m_customer".into(), c.clone(), s), (n, sum));
        }
    }
    let _ = tumbling_start;
    t
}

/// The latest value of every `revenue-windows` key, merged across input
/// partitions: (count, USD micros) per (definition, group, start).
pub fn published_totals(brokers: &str) -> Totals {
    let mut latest: BTreeMap<Vec<u8>, Option<WindowRecord>> = BTreeMap::new();
    for r in read_all(brokers, "revenue-windows") {
        if r.key
            .as_deref()
            .is_some_and(|k| k.starts_with(tally::wire::PROGRESS_PREFIX.as_bytes()))
        {
            continue;
        }
        let v = r
            .payload
            .map(|p| serde_json::from_slice::<WindowRecord>(&p).expect("window record"));
        latest.insert(r.key.expect("keyed"), v);
    }
    let mut t: Totals = BTreeMap::new();
    for w in latest.into_values().flatten() {
        let e = t.entry((w.spec, w.key, w.start)).or_default();
        e.0 += w.count;
        e.1 += w.revenue_usd_micros;
    }
    t
}

/// Panics with the first differences, if any.
pub fn assert_totals_equal(got: &Totals, want: &Totals) {
    let mut diffs = Vec::new();
    for (k, v) in want {
        if got.get(k) != Some(v) {
            diffs.push(format!("{k:?}: want {v:?}, got {:?}", got.get(k)));
        }
    }
    for (k, v) in got {
        if !want.contains_key(k) {
            diffs.push(format!("{k:?}: unexpected {v:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} windows differ:\n{}",
        diffs.len(),
        want.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Follows `revenue-windows` from the start while a test runs, keeping the
/// latest row per key, as the serving view does. Reading the topic only at
/// the end would lose rows: the mock cluster keeps ~5 MiB per partition and
/// deletes the oldest records (it does not compact).
/// Latest value per key (`None`: a tombstone).
type Latest = std::sync::Arc<std::sync::Mutex<BTreeMap<Vec<u8>, Option<Vec<u8>>>>>;
/// Per key, the row of the newest writer epoch (as the view keeps it), and
/// how many rows of an older epoch came after a newer one.
type ByEpoch = std::sync::Arc<std::sync::Mutex<(BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>, u64)>>;

/// What [`WindowsFollower::finish_both`] read.
pub struct Published {
    /// The latest row of every key: what compaction leaves.
    pub latest: Totals,
    /// The row of the newest writer epoch of every key: what the view
    /// serves (it ignores a stale writer's row).
    pub newest_epoch: Totals,
    /// Rows of an older epoch written after a newer one's (a zombie's).
    pub stale_rows: u64,
    /// Keys whose latest row is such a stale row.
    pub stale_latest: usize,
}

pub struct WindowsFollower {
    latest: Latest,
    by_epoch: ByEpoch,
    positions: std::sync::Arc<std::sync::Mutex<HashMap<i32, i64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    brokers: String,
}

impl WindowsFollower {
    pub fn start(brokers: &str) -> WindowsFollower {
        use std::sync::{atomic::AtomicBool, Arc, Mutex};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "tally-test-follower")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(&topic("revenue-windows")), Duration::from_secs(10))
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(&topic("revenue-windows"), p.id(), Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let latest = Arc::new(Mutex::new(BTreeMap::new()));
        let by_epoch: ByEpoch = Arc::new(Mutex::new((BTreeMap::new(), 0)));
        let positions = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (latest, by_epoch, positions, stop) = (
                latest.clone(),
                by_epoch.clone(),
                positions.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
                        positions
                            .lock()
                            .unwrap()
                            .insert(m.partition(), m.offset() + 1);
                        if let Some(k) = m.key() {
                            let v = m.payload().map(<[u8]>::to_vec);
                            latest.lock().unwrap().insert(k.to_vec(), v.clone());
                            let mut b = by_epoch.lock().unwrap();
                            let old = b.0.get(k).map_or(0, |(e, _)| *e);
                            match &v {
                                // A tombstone has no epoch: applied, as the view does.
                                None => {
                                    b.0.insert(k.to_vec(), (old, None));
                                }
                                Some(bytes) => {
                                    let e = serde_json::from_slice::<serde_json::Value>(bytes)
                                        .ok()
                                        .and_then(|j| j.get("epoch")?.as_u64())
                                        .unwrap_or(0);
                                    if e < old {
                                        b.1 += 1;
                                    } else {
                                        b.0.insert(k.to_vec(), (e, v));
                                    }
                                }
                            }
                        }
                    }
                }
            })
        };
        WindowsFollower {
            latest,
            by_epoch,
            positions,
            stop,
            thread: Some(thread),
            brokers: brokers.to_string(),
        }
    }

    /// Waits until every row written so far has been read, then stops:
    /// the totals of the latest row of every key.
    pub fn finish(self) -> Totals {
        self.finish_both().latest
    }

    /// [`WindowsFollower::finish`], with the totals a reader that ignores
    /// a stale writer's rows sees (the view), and how many such rows came.
    pub fn finish_both(mut self) -> Published {
        let ends = end_offsets(&self.brokers, "revenue-windows");
        wait_until(
            "the follower to read revenue-windows to its end",
            Duration::from_secs(60),
            || {
                let pos = self.positions.lock().unwrap();
                ends.iter()
                    .all(|(p, end)| *end == 0 || pos.get(p).is_some_and(|o| o >= end))
            },
        );
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let latest = self.latest.lock().unwrap();
        let by_epoch = self.by_epoch.lock().unwrap();
        let stale_latest = latest
            .iter()
            .filter(|(k, v)| by_epoch.0.get(*k).is_some_and(|(_, nv)| nv != *v))
            .count();
        Published {
            latest: totals_of(latest.iter().map(|(k, v)| (k.clone(), v.clone()))),
            newest_epoch: totals_of(by_epoch.0.iter().map(|(k, (_, v))| (k.clone(), v.clone()))),
            stale_rows: by_epoch.1,
            stale_latest,
        }
    }
}

/// (count, USD micros) per (definition, group, start) from the latest row
/// of every key, merged across input partitions.
fn totals_of(rows: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>) -> Totals {
    let mut t: Totals = BTreeMap::new();
    for (k, v) in rows {
        if k.starts_with(tally::wire::PROGRESS_PREFIX.as_bytes()) {
            continue;
        }
        let Some(v) = v else { continue };
        let w: WindowRecord = serde_json::from_slice(&v).expect("window record");
        let e = t.entry((w.spec, w.key, w.start)).or_default();
        e.0 += w.count;
        e.1 += w.revenue_usd_micros;
    }
    t
}

/// Where the valid orders of `records` that never reached `enriched-orders`
/// went instead (where it is in `raw-orders`, `orders-late`, `orders-dlq`),
/// one line each
/// (at most 20): what a failed exactness check needs first.
pub fn explain_missing(brokers: &str, records: &[GenRecord]) -> String {
    let order_id = |payload: &Option<Vec<u8>>| -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(payload.as_deref()?).ok()?;
        let v = v.get("order").unwrap_or(&v);
        Some(v.get("order_id")?.as_str()?.to_string())
    };
    let enriched: std::collections::HashSet<String> = read_all(brokers, "enriched-orders")
        .iter()
        .filter_map(|r| order_id(&r.payload))
        .collect();
    let mut elsewhere: HashMap<String, Vec<String>> = HashMap::new();
    for name in ["raw-orders", "orders-late", "orders-dlq"] {
        for r in read_all(brokers, name) {
            let id = order_id(&r.payload).or_else(|| {
                r.key
                    .as_deref()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
            });
            if let Some(id) = id {
                elsewhere.entry(id).or_default().push(format!(
                    "{name}/{}@{} {:?}",
                    r.partition, r.offset, r.headers
                ));
            }
        }
    }
    let mut lines = Vec::new();
    for r in records {
        let Expect::Valid {
            order_id: id,
            created_at_ms,
            ..
        } = &r.expect
        else {
            continue;
        };
        if enriched.contains(id) {
            continue;
        }
        let went = elsewhere
            .get(id)
            .map_or("not even in raw-orders".to_string(), |v| v.join("; "));
        lines.push(format!("{id} (created_at {created_at_ms}): {went}"));
    }
    let n = lines.len();
    lines.truncate(20);
    format!(
        "{n} valid orders never reached enriched-orders:\n{}",
        lines.join("\n")
    )
}
