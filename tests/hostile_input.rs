//! Hostile input, end to end through a pod: one bad record never stops
//! or corrupts the processing of the others, and every rejected record
//! reaches the DLQ with its reason.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::kafka::*;
use tally::gen::{self, Expect, GenRecord, GenSpec};
use tally_core::Reason;

/// A future-dated order (`created_at` in 2099, inside the accepted
/// range) among ordinary ones: it goes to the DLQ as
/// `timestamp_in_future`, and every other order of its partition, and of
/// every other partition, is counted exactly.
///
/// Reproduced first on the code before the check: the order moved its
/// partition's watermark to 2099, so the orders after it on that
/// partition were late (`orders-late`), and the totals came out short
/// (`assert_totals_equal` failed on every window after the order's).
#[test]
fn a_future_dated_order_goes_to_the_dlq_and_stops_nothing() {
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let mut records = gen::generate(&GenSpec {
        count: 3_000,
        seed: 11,
        customers: 200,
        invalid_pct: 0.0,
        duplicate_pct: 0.0,
        late_pct: 0.0,
        ..GenSpec::default()
    });
    // Early in the stream, with the key of a customer that orders
    // throughout it, so its partition has many orders after it.
    let key = records[0].key.clone();
    let customer = String::from_utf8(key.clone()).unwrap();
    let future = GenRecord {
        key,
        payload: format!(
            r#"{{"order_id":"future-1","customer_id":"{customer}","amount":10,"currency":"USD","created_at":"2099-01-01T00:00:00Z","region":"eu"}}"#
        )
        .into_bytes(),
        expect: Expect::Invalid {
            reason: Reason::TimestampInFuture,
        },
    };
    records.insert(20, future);
    produce_input(&brokers, &records);

    let dir = temp_dir("future-dated");
    let cfg = pod_config(&brokers, "future-dated", dir.clone());
    run_to_the_end(&brokers, "future-dated", &cfg, "every input offset");

    assert_totals_equal(&published_totals(&brokers), &truth_totals(&records));
    let dlq: BTreeMap<String, String> = read_all(&brokers, "orders-dlq")
        .iter()
        .map(|r| {
            let payload = String::from_utf8(r.payload.clone().unwrap()).unwrap();
            (payload, r.headers["reason"].clone())
        })
        .collect();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let (payload, reason) = dlq.iter().next().unwrap();
    assert!(payload.contains("future-1"), "{payload}");
    assert_eq!(reason, "timestamp_in_future");
    assert!(
        read_all(&brokers, "orders-late").is_empty(),
        "no order was made late by the future-dated one"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second pod started on a running pod's `--state-dir` refuses to
/// start, naming the directory and the other process, and touches
/// nothing in it: the running pod's serving store stays as it was and
/// the running pod stays ready.
///
/// Reproduced first on the code before the lock: the second pod deleted
/// and recreated the running pod's `view-sessions` store (a new inode)
/// before it found the state store locked and exited.
#[test]
fn a_second_pod_on_the_same_state_dir_touches_nothing() {
    use std::os::unix::fs::MetadataExt;
    use support::procs::*;
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let dir = temp_dir("state-lock");
    let log = dir.with_extension("log");
    let mut a = spawn_pod("a", &brokers, "state-lock", &dir, &log);
    wait_until("pod a to be ready", Duration::from_secs(60), || {
        a.get("/readyz").is_some_and(|(s, _)| s == 200)
    });
    let shelf = dir.join("view-sessions");
    let before = std::fs::metadata(&shelf).unwrap().ino();

    let mut b = spawn_pod("b", &brokers, "state-lock", &dir, &log);
    let mut status = None;
    wait_until("pod b to exit", Duration::from_secs(60), || {
        status = b.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    assert_eq!(
        std::fs::metadata(&shelf).unwrap().ino(),
        before,
        "the running pod's view-sessions store was recreated"
    );
    let b_log = std::fs::read_to_string(log.with_extension("b.log")).unwrap();
    assert!(b_log.contains(dir.to_str().unwrap()), "{b_log}");
    assert!(b_log.contains("in use by"), "{b_log}");
    assert!(b_log.contains(&format!("pid {}", a.child.id())), "{b_log}");

    assert!(a.get("/readyz").is_some_and(|(s, _)| s == 200));
    a.assert_alive(&log);
    a.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pod whose engine thread fails (here RocksDB cannot write: the
/// process may not grow a file past 256 KiB, as on a full disk) says so
/// within seconds: `/livez` and `/readyz` turn 503 naming the cause, and
/// the process exits with an error soon after, without flushing. A pod
/// started after it on the same state directory, with room to write,
/// then processes every order exactly.
///
/// Reproduced first on the code before: `/livez` and `/readyz` answered
/// 200 (`"ready": true`) after the engine had stopped, and the process
/// stayed up for the revoke callback's flush budget (a third of
/// `max.poll.interval.ms`, 100 s) before it exited (checked: the wait
/// for `/livez` to turn 503 timed out).
#[test]
fn a_failed_engine_is_neither_live_nor_ready_and_exits_promptly() {
    use std::os::unix::process::CommandExt;
    use support::procs::*;
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let records = gen::generate(&GenSpec {
        count: 20_000,
        seed: 5,
        customers: 5_000,
        invalid_pct: 0.0,
        duplicate_pct: 0.0,
        late_pct: 0.0,
        ..GenSpec::default()
    });
    produce_input(&brokers, &records);
    let ends = end_offsets(&brokers, "raw-orders");
    let dir = temp_dir("engine-fails");
    let log = dir.with_extension("log");
    let port = free_port();
    let mut cmd = pod_command("a", &brokers, "engine-fails", &dir, &log, port);
    // Little to log: the log file is under the same size limit.
    cmd.env("TALLY_LOG", "warn");
    // The limit and an ignored SIGXFSZ pass to the child: a write past
    // the limit then fails with EFBIG instead of killing the process.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 256 * 1024,
                rlim_max: 256 * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut livez = None;
    wait_until(
        "/livez to say the engine failed",
        Duration::from_secs(60),
        || {
            livez = http_get(port, "/livez").filter(|(s, _)| *s == 503);
            livez.is_some() || child.try_wait().unwrap().is_some()
        },
    );
    let (_, body) = livez.expect("/livez answered 503 before the process exited");
    assert_eq!(body["error"], "engine_failed", "{body}");
    if let Some((s, ready)) = http_get(port, "/readyz") {
        assert_eq!(s, 503);
        assert!(ready["not_ready_because"][0]
            .as_str()
            .unwrap()
            .contains("engine thread failed"));
    }
    let turned = std::time::Instant::now();
    let mut status = None;
    wait_until("the failed pod to exit", Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    assert!(turned.elapsed() < Duration::from_secs(15));
    let text = std::fs::read_to_string(log.with_extension("a.log")).unwrap();
    assert!(text.contains("engine thread failed"), "{text}");

    // Nothing was lost: a pod with room to write finishes the work.
    let mut b = spawn_pod("b", &brokers, "engine-fails", &dir, &log);
    wait_until(
        "pod b to commit every input offset",
        Duration::from_secs(120),
        || {
            b.assert_alive(&log);
            committed(&brokers, "engine-fails", "raw-orders") == ends
        },
    );
    b.stop();
    assert_totals_equal(&published_totals(&brokers), &truth_totals(&records));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record near `raw-orders`' size limit (900 KB, over the 64 KiB input
/// limit) goes to the DLQ as `oversize` with a bounded copy: its first
/// `--max-message-bytes`, marked `truncated`, with the original size and
/// its source offset. The orders after it are all counted.
///
/// Reproduced first on the code before: the DLQ copy was the whole
/// 900 KB plus six headers (checked: the payload-length assertion saw
/// 900,000). On a broker whose `orders-dlq` has the same 1 MB limit as
/// `raw-orders`, such a copy is refused, the batch is never acknowledged,
/// and the pod stops processing; the mock cluster does not enforce topic
/// size limits, so this test checks the bound that prevents it.
#[test]
fn a_record_near_the_size_limit_gets_a_bounded_dlq_copy() {
    let broker = TestBroker::start(1, &declared_topics());
    let brokers = broker.bootstrap_servers();
    let mut records = gen::generate(&GenSpec {
        count: 500,
        seed: 3,
        customers: 50,
        invalid_pct: 0.0,
        duplicate_pct: 0.0,
        late_pct: 0.0,
        ..GenSpec::default()
    });
    let big = GenRecord {
        key: records[0].key.clone(),
        payload: vec![b'x'; 900_000],
        expect: Expect::Invalid {
            reason: Reason::Oversize,
        },
    };
    records.insert(10, big);
    produce_input(&brokers, &records);
    let dir = temp_dir("oversize");
    let cfg = pod_config(&brokers, "oversize", dir.clone());
    run_to_the_end(&brokers, "oversize", &cfg, "every input offset");
    assert_totals_equal(&published_totals(&brokers), &truth_totals(&records));
    let dlq = read_all(&brokers, "orders-dlq");
    assert_eq!(dlq.len(), 1);
    let r = &dlq[0];
    assert_eq!(r.headers["reason"], "oversize");
    assert_eq!(r.payload.as_ref().unwrap().len(), 64 * 1024);
    assert_eq!(r.headers["truncated"], "true");
    assert_eq!(r.headers["original_size"], "900000");
    assert!(r.headers["source_offset"].parse::<i64>().is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
