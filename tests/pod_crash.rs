//! Crash safety: the pod runs as a child process and is SIGKILLed at random
//! moments (mid-batch, mid-flush, mid-rebalance) while orders keep arriving.
//! After the last restart catches up, every window total equals the truth
//! exactly, and no DLQ or late record is missing.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::kafka::*;
use tally::gen::{self, Expect, GenSpec};

/// SIGKILLs that must land on a pod that was processing.
const KILLS: usize = 20;
const MAX_KILLS: usize = 50;

fn spawn_pod(brokers: &str, state: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "run",
            "--brokers",
            brokers,
            "--group",
            &group("crash"),
            "--http",
            "127.0.0.1:0",
        ])
        .args(topic_args())
        .args([
            "--apply-topics=false",
            "--session-timeout-ms",
            "1000",
            "--flush-interval-ms",
            "30",
        ])
        .args(["--flush-max-events", "500"])
        .arg("--state-dir")
        .arg(state)
        .env("TALLY_LOG", "warn,tally=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn tally run")
}

/// Lets the child run until `at`, failing if it dies on its own.
fn run_until(child: &mut Child, at: Instant, log: &Path) {
    while Instant::now() < at {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the pod exited by itself ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// Also a restore's true end when run against tansu
/// (`scripts/test-tansu.sh`), whose high watermark undercounts: a restore
/// that trusted it stopped short of the changelog's end, and local state
/// that reflected the last batch looked ahead of the changelog and was
/// thrown away. On the commit before `restore::true_end`, with the tansu
/// skip removed: "23 SIGKILLs, 20 while processing … 16 of 542 windows
/// differ"; after: one run exact (25 SIGKILLs), the next two orders short
/// ("16 of 556 windows differ"). So it still skips tansu: scenario 6 is
/// not closed.
#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    if skip_on_tansu(
        "on tansu it is not exact yet: with restore reading to the changelog's real end it passed once (25 SIGKILLs) and then ended two orders short (16 of 556 windows); the cause is not found",
    ) {
        return;
    }
    let specs = declared_topics();
    let broker = TestBroker::start(1, &specs);
    let brokers = broker.bootstrap_servers();
    // More than the kill phase sends (it stops the producer): the input
    // never runs out while kills still have to land on a working pod.
    let records = gen::generate(&GenSpec {
        count: 80_000,
        seed: 11,
        customers: 400,
        invalid_pct: 2.0,
        duplicate_pct: 2.0,
        late_pct: 1.0,
        ..GenSpec::default()
    });
    // Every window row is read as it is written (see WindowsFollower).
    let follower = WindowsFollower::start(&brokers);
    // Orders keep arriving for the whole kill phase.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (brokers, records, stop) = (brokers.clone(), records.clone(), stop.clone());
        std::thread::spawn(move || {
            gen::produce(
                &brokers,
                &topic("raw-orders"),
                &[],
                &records,
                450.0,
                &|| stop.load(Ordering::SeqCst),
            )
            .unwrap()
        })
    };

    let state = temp_dir("crash");
    let log = state.with_extension("log");
    let mut rng: u64 = 0x5eed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Kills that landed while the pod was making progress (committed
    // offsets moved since the previous kill): the ones that test anything.
    let mut progressed = 0;
    let mut last_committed = 0i64;
    let mut kills = 0;
    while progressed < KILLS && kills < MAX_KILLS {
        kills += 1;
        let mut child = spawn_pod(&brokers, &state, &log);
        // On tansu a replacement takes longer to join the group (about
        // every other one waited out its killed predecessor's session), so
        // it gets longer to reach processing before it is killed.
        let after = if on_tansu() {
            Duration::from_millis(3_000 + next() % 3_000)
        } else {
            Duration::from_millis(1_500 + next() % 2_000)
        };
        run_until(&mut child, Instant::now() + after, &log);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let now: i64 = committed(&brokers, "crash", "raw-orders").values().sum();
        if now > last_committed {
            progressed += 1;
        }
        eprintln!("kill {kills} after {after:?}: {now} offsets committed");
        last_committed = now;
    }
    stop.store(true, Ordering::SeqCst);
    let sent = producer.join().unwrap() as usize;
    assert!(
        progressed >= KILLS,
        "only {progressed} of {kills} kills hit a pod that was processing"
    );
    eprintln!("{kills} SIGKILLs, {progressed} while processing; {sent} records sent");
    let records = &records[..sent];

    let ends = end_offsets(&brokers, "raw-orders");
    let mut child = spawn_pod(&brokers, &state, &log);
    wait_until("the last pod to catch up", Duration::from_secs(180), || {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the pod exited ({status}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        committed(&brokers, "crash", "raw-orders") == ends
    });
    let status = support::procs::sigterm_and_wait(&mut child, "the last pod");
    assert!(status.success(), "exit after SIGTERM: {status}");

    assert_totals_equal(&follower.finish(), &truth_totals(records));

    let dlq: BTreeSet<Vec<u8>> = read_all(&brokers, "orders-dlq")
        .into_iter()
        .filter_map(|r| r.payload)
        .collect();
    let late: BTreeSet<String> = read_all(&brokers, "orders-late")
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(r.payload.as_ref().unwrap()).unwrap()
                ["order_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for r in records {
        match &r.expect {
            Expect::Invalid { .. } => assert!(
                dlq.contains(&r.payload),
                "lost DLQ record {}",
                String::from_utf8_lossy(&r.payload)
            ),
            Expect::Late { order_id } => {
                assert!(late.contains(order_id), "lost late record {order_id}")
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&log);
}
