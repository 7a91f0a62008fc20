//! The multi-process run shared by churn.rs and long_kill.rs: an embedded
//! broker, a producer thread with known truth, and pods as child processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::kafka::*;
use super::procs::*;
use tally::gen::{self, GenRecord, GenSpec};

pub struct Run {
    _broker: TestBroker,
    pub brokers: String,
    records: Vec<GenRecord>,
    stop: Arc<AtomicBool>,
    producer: Option<JoinHandle<u64>>,
    log: PathBuf,
    dirs: Vec<PathBuf>,
    follower: Option<WindowsFollower>,
}

impl Run {
    pub fn start(name: &str, count: u64, rate: f64) -> Run {
        Run::on_brokers(name, count, rate, 1)
    }

    /// [`Run::start`] on a mock cluster of `n` brokers.
    pub fn on_brokers(name: &str, count: u64, rate: f64, n: i32) -> Run {
        let specs = declared_topics();
        let broker = TestBroker::start(n, &specs);
        let brokers = broker.bootstrap_servers();
        let records = gen::generate(&GenSpec {
            count,
            seed: 97,
            customers: 500,
            invalid_pct: 1.0,
            duplicate_pct: 2.0,
            late_pct: 0.5,
            ..GenSpec::default()
        });
        let follower = Some(WindowsFollower::start(&brokers));
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (brokers, records, stop) = (brokers.clone(), records.clone(), stop.clone());
            std::thread::spawn(move || {
                gen::produce(&brokers, &topic("raw-orders"), &[], &records, rate, &|| {
                    stop.load(Ordering::SeqCst)
                })
                .unwrap()
            })
        };
        Run {
            _broker: broker,
            brokers,
            records,
            stop,
            producer: Some(producer),
            log: temp_dir(name).with_extension("log"),
            dirs: Vec::new(),
            follower,
        }
    }

    /// The mock cluster, for fault injection.
    pub fn mock(&self) -> Option<&tally::kafka::broker::EmbeddedBroker> {
        self._broker.mock()
    }

    pub fn dir(&mut self, name: &str) -> PathBuf {
        let d = temp_dir(name);
        self.dirs.push(d.clone());
        d
    }

    pub fn pod(&self, name: &str, dir: &Path) -> Pod {
        spawn_pod(name, &self.brokers, "churn", dir, &self.log)
    }

    /// Stops the producer; returns the records actually sent.
    /// The totals of every window row written (read as they were written).
    pub fn published(&mut self) -> Totals {
        self.follower
            .take()
            .expect("published() is called once")
            .finish()
    }

    /// [`Run::published`], as compaction leaves it and as the view serves it.
    pub fn published_both(&mut self) -> Published {
        self.follower
            .take()
            .expect("published() is called once")
            .finish_both()
    }

    pub fn finish_input(&mut self) -> Vec<GenRecord> {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.producer.take().unwrap().join().unwrap() as usize;
        self.records[..sent].to_vec()
    }

    pub fn wait_caught_up(&self, pods: &mut [Pod]) {
        let ends = end_offsets(&self.brokers, "raw-orders");
        wait_until(
            "the group to commit every input offset",
            Duration::from_secs(180),
            || {
                for p in pods.iter_mut() {
                    p.assert_alive(&self.log);
                }
                committed(&self.brokers, "churn", "raw-orders") == ends
            },
        );
    }

    /// Runs `pod` until `at`, failing if it dies on its own.
    pub fn run_until(&self, pods: &mut [Pod], at: Instant) {
        while Instant::now() < at {
            for p in pods.iter_mut() {
                p.assert_alive(&self.log);
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
