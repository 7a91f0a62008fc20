//! Broker faults, injected with the mock cluster: request errors on Produce,
//! Fetch and OffsetCommit, and a broker that goes down and comes back. The
//! pod retries, does not crash, and loses or doubles nothing.

mod support;

use std::time::Duration;

use rdkafka::mocking::MockCoordinator;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::kafka::*;
use tally::gen::{self, GenSpec};
use tally::pod;

#[test]
fn request_errors_and_a_broker_outage_lose_and_double_nothing() {
    if skip_on_external(
        "it injects request errors and takes a broker down, which only the mock cluster can do",
    ) {
        return;
    }
    let specs = declared_topics();
    let broker = TestBroker::start(3, &specs);
    let brokers = broker.bootstrap_servers();
    let cluster = broker.mock().expect("the mock cluster").cluster();
    // Keep the group coordinator on broker 2, so taking broker 1 down hits
    // partition leaders and the pod's outputs, not the group itself.
    cluster
        .coordinator(MockCoordinator::Group("faults".into()), 2)
        .unwrap();

    let records = gen::generate(&GenSpec {
        count: 9_000,
        seed: 23,
        customers: 300,
        invalid_pct: 2.0,
        duplicate_pct: 2.0,
        late_pct: 1.0,
        ..GenSpec::default()
    });
    let (a, rest) = records.split_at(3_000);
    let (b, c) = rest.split_at(3_000);

    let mut cfg = pod_config(&brokers, "faults", temp_dir("faults"));
    // A short flush budget, so an unacknowledged flush shows up quickly.
    cfg.kafka.max_poll_interval_ms = 9_000;
    let handle = pod::start(cfg.clone()).unwrap();
    let stats = handle.stats.clone();
    let caught_up = |what: &str| {
        wait_all_committed(&brokers, "faults", what, Duration::from_secs(120));
    };

    produce_input(&brokers, a);
    caught_up("the first third");

    // Retriable errors on every request kind the pod depends on.
    let err = |e: RDKafkaRespErr, n: usize| vec![e; n];
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &err(RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, 8),
    );
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &err(
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            8,
        ),
    );
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &err(RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT, 4),
    );
    produce_input(&brokers, b);
    caught_up("the second third, through request errors");

    // A broker outage: its partitions cannot be written until it returns.
    let flush_failures_before = stats.flush_failures();
    cluster.broker_down(1).unwrap();
    let producer = {
        let (brokers, c) = (brokers.clone(), c.to_vec());
        std::thread::spawn(move || {
            gen::produce(&brokers, &topic("raw-orders"), &[], &c, 0.0, &|| false)
        })
    };
    wait_until(
        "the pod to notice unacknowledged outputs",
        Duration::from_secs(60),
        || stats.flush_failures() > flush_failures_before,
    );
    assert!(!handle.is_finished(), "the pod must survive the outage");
    cluster.broker_up(1).unwrap();
    producer.join().unwrap().unwrap();
    caught_up("the last third, after the outage");

    assert!(!handle.is_finished());
    handle.join().unwrap();
    assert_totals_equal(&published_totals(&brokers), &truth_totals(&records));
    let _ = std::fs::remove_dir_all(&cfg.resources.state_dir);
}
