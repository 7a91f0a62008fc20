//! At least 100 SIGKILLs across three pods (separate processes, one group),
//! restarting each on its own state or, one time in five, on an empty one,
//! while orders keep arriving: every window total equals the truth.
//! Its own test binary, so no other mock cluster runs beside it.
//! `make test-long-kill` runs it (it is ignored by `make test`, see below).

mod support;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::churn::Run;
use support::kafka::*;
use support::procs::*;

/// About 75 s, so CI runs it as a step of its own (`make test-long-kill`)
/// after `make test`. With 1 s sessions, librdkafka's mock group coordinator
/// aborted (`rd_kafka_mock_cgrp_classic_member_add: Assertion
/// '!member->resp'`) in about one run in three; with 3 s sessions and the
/// poll-under-lock deadlock fixed, it passed 5 runs of 5.
#[test]
#[ignore = "about 75 s: CI runs it as a separate step, `make test-long-kill`"]
fn a_hundred_sigkills_across_pods_keep_totals_exact() {
    if skip_on_tansu(
        "with several members in one group, tansu was seen giving each of them the same partitions",
    ) {
        return;
    }
    const KILLS: usize = 100;
    let mut run = Run::start("longkill", 200_000, 600.0);
    let dirs: Vec<PathBuf> = (0..3).map(|i| run.dir(&format!("lk-{i}"))).collect();
    let mut pods: Vec<Pod> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| run.pod(&format!("p{i}"), d))
        .collect();
    let mut rng: u64 = 0xC0FFEE;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for k in 0..KILLS {
        let at = Instant::now() + Duration::from_millis(200 + next() % 800);
        run.run_until(&mut pods, at);
        let i = (next() % 3) as usize;
        pods[i].kill();
        // Mostly restart on the same state; sometimes on an empty one.
        let dir = if next() % 5 == 0 {
            run.dir(&format!("lk-{i}-{k}"))
        } else {
            dirs[i].clone()
        };
        pods[i] = run.pod(&format!("p{i}-{k}"), &dir);
    }
    let records = run.finish_input();
    run.wait_caught_up(&mut pods);
    assert_totals_equal(&run.published(), &truth_totals(&records));
    for p in pods.iter_mut() {
        p.stop();
    }
}
