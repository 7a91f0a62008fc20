//! FX rates followed live, and topic declarations applied with drift reported.

mod support;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use support::kafka::*;
use tally::kafka::topics::{self, TopicSpec, TopicStatus};
use tally::pod;

fn specs() -> Vec<TopicSpec> {
    declared_topics()
}

fn send(brokers: &str, topic: &str, key: &str, payload: &str) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topic = support::kafka::topic(topic);
    p.send(BaseRecord::to(&topic).key(key).payload(payload))
        .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();
}

fn order(id: &str, currency: &str) -> String {
    format!(
        r#"{{"order_id":"{id}","customer_id":"c1","amount":10,"currency":"{currency}","created_at":"2024-05-01T12:00:00Z"}}"#
    )
}

#[test]
fn fx_rates_are_seeded_then_followed_live() {
    let broker = TestBroker::start(1, &specs());
    let brokers = broker.bootstrap_servers();
    let handle = pod::start(pod_config(&brokers, "fx", temp_dir("fx"))).unwrap();
    // The empty topic was seeded with the defaults.
    wait_until("fx-rates to be seeded", Duration::from_secs(30), || {
        read_all(&brokers, "fx-rates").len() >= 6
    });

    send(&brokers, "raw-orders", "c1", &order("before", "NZD"));
    wait_until(
        "the NZD order to be rejected",
        Duration::from_secs(30),
        || {
            read_all(&brokers, "orders-dlq")
                .iter()
                .any(|r| r.headers.get("reason").map(String::as_str) == Some("unknown_currency"))
        },
    );
    send(
        &brokers,
        "fx-rates",
        "NZD",
        r#"{"currency":"NZD","rate":0.6}"#,
    );
    // Orders processed after the update see the new rate.
    wait_until(
        "an NZD order to be enriched",
        Duration::from_secs(30),
        || {
            send(
                &brokers,
                "raw-orders",
                "c1",
                &order(&format!("after-{}", tally::pod::now_ms()), "NZD"),
            );
            read_all(&brokers, "enriched-orders").iter().any(|r| {
                let v: serde_json::Value =
                    serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
                v["currency"] == "NZD" && v["amount_usd"] == 6.0
            })
        },
    );
    handle.join().unwrap();
}

/// The status `topics apply` reported for the test's topic `name`.
fn status_of(report: &[(String, TopicStatus)], name: &str) -> TopicStatus {
    let name = topic(name);
    report
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s.clone())
        .unwrap_or_else(|| panic!("{name} is not in the report: {report:?}"))
}

#[test]
fn topics_apply_reports_what_exists_and_what_drifted() {
    // Names of its own: the other test of this file uses the declared
    // topics, and on an external broker both share one name prefix.
    let mut declared = specs();
    for t in &mut declared {
        t.name = format!("drift-{}", t.name);
    }
    // The broker has raw-orders with fewer partitions than declared.
    let mut on_broker = declared.clone();
    on_broker
        .iter_mut()
        .find(|t| t.name == "drift-raw-orders")
        .unwrap()
        .partitions = 3;
    let broker = TestBroker::start(1, &on_broker);
    declared.push(TopicSpec {
        name: "drift-brand-new".into(),
        partitions: 2,
        replication_factor: 1,
        config: Default::default(),
    });
    for t in &mut declared {
        t.name = topic(&t.name);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt
        .block_on(topics::apply(&broker.bootstrap_servers(), &[], &declared))
        .unwrap();
    let status = |n: &str| status_of(&report, &format!("drift-{n}"));
    assert_eq!(
        status("raw-orders"),
        TopicStatus::Drift("3 partitions, declared 6".into())
    );
    assert_eq!(status("revenue-windows"), TopicStatus::Matches);
    // The mock cluster may or may not implement CreateTopics; either way the
    // missing topic is reported, never silently ignored.
    assert!(
        matches!(
            status("brand-new"),
            TopicStatus::Created | TopicStatus::NotCreated(_)
        ),
        "{report:?}"
    );
}

/// On Apache Kafka, `tally topics apply` also reports a declared config
/// that differs on the broker (here `cleanup.policy`, which decides
/// whether the changelog and `revenue-windows` keep every key), and still
/// creates what is missing. The mock cluster and tansu cannot describe
/// configs (no DescribeConfigs), so elsewhere this prints SKIPPED.
///
/// Reproduced first on Kafka 4.4 with the config comparison switched off
/// (the code before compared partition counts only): the topic whose
/// policy differed was reported as `Matches`.
#[test]
fn topics_apply_reports_config_drift_on_kafka() {
    if !on_kafka() {
        eprintln!("SKIPPED: only Apache Kafka describes topic configs among the brokers tested");
        return;
    }
    let compacted = TopicSpec {
        name: "config-drift-windows".into(),
        partitions: 2,
        replication_factor: 1,
        config: [("cleanup.policy".to_string(), "compact".to_string())]
            .into_iter()
            .collect(),
    };
    let mut on_broker = compacted.clone();
    on_broker
        .config
        .insert("cleanup.policy".into(), "delete".into());
    let broker = TestBroker::start(1, &[on_broker]);
    let mut declared = vec![
        compacted,
        TopicSpec {
            name: "config-drift-new".into(),
            partitions: 2,
            replication_factor: 1,
            config: Default::default(),
        },
    ];
    for t in &mut declared {
        t.name = topic(&t.name);
    }
    let report = topics::apply_blocking(&broker.bootstrap_servers(), &[], &declared).unwrap();
    let status = |n: &str| status_of(&report, n);
    assert_eq!(
        status("config-drift-windows"),
        TopicStatus::Drift("cleanup.policy is delete, declared compact".into())
    );
    assert_eq!(status("config-drift-new"), TopicStatus::Created);
}
