//! Everything that talks to Kafka's own machinery, as opposed to the job's
//! topics' formats (`wire`).
//!
//! - [`Clients`]: the one client factory. Every consumer, producer and
//!   admin client of tally goes through it, so the user's
//!   `kafka_properties` (TLS, SASL, …) apply to all of them.
//! - [`topics`]: topic declarations (compiled in, or a directory) and
//!   applying them.
//! - [`broker`]: the embedded broker (librdkafka's mock cluster), for the
//!   demo and tests.

pub mod broker;
pub mod topics;

use rdkafka::config::ClientConfig;

/// How to reach the cluster: the bootstrap servers and the user's extra
/// librdkafka properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clients {
    pub brokers: String,
    /// Applied last, so a user's setting wins over tally's.
    pub extra: Vec<(String, String)>,
}

impl Clients {
    pub fn new(brokers: impl Into<String>, extra: &[(String, String)]) -> Clients {
        Clients {
            brokers: brokers.into(),
            extra: extra.to_vec(),
        }
    }

    /// A client with tally's `settings` for its role, then the user's
    /// properties.
    pub fn config(&self, settings: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in settings {
            c.set(*k, *v);
        }
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// A consumer that assigns partitions itself and never commits: the
    /// readers of `fx-rates`, the changelog, `revenue-windows` and replay.
    /// `group` only names it in the broker's logs.
    pub fn reader(&self, group: &str) -> ClientConfig {
        self.config(&[
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
            // librdkafka's 500 ms default holds a fetch on a quiet partition
            // that long, which would dominate catch-up and freshness.
            ("fetch.wait.max.ms", "10"),
        ])
    }

    /// An idempotent producer that waits for every in-sync replica.
    pub fn producer(&self) -> ClientConfig {
        self.config(&[("enable.idempotence", "true"), ("acks", "all")])
    }
}

/// Whether a Kafka error is one that goes away by itself: a leader moving,
/// a timeout, a broker or the whole cluster briefly unreachable. Start-up
/// and restore retry these with back-off instead of giving up (or worse,
/// throwing state away).
pub fn is_transient(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::RequestTimedOut
                | C::OperationTimedOut
                | C::BrokerTransportFailure
                | C::AllBrokersDown
                | C::NetworkException
                | C::BrokerNotAvailable
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::CoordinatorLoadInProgress
                | C::Resolve
                // A broker's handle torn down with a request in flight (a
                // broker leaving and coming back): the soak saw it on a
                // metadata request while a broker was down.
                | C::DestroyBroker
                // A metadata request while the partition's leader is down
                // (the view's start must ride it out). A
                // topic that truly lacks a partition is refused by the
                // partition-count check at start, and every retry here
                // has a deadline.
                | C::UnknownPartition
        )
    )
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn a_partition_whose_leader_is_down_is_transient() {
        assert!(super::is_transient(&KafkaError::MetadataFetch(
            C::UnknownPartition
        )));
        assert!(!super::is_transient(&KafkaError::MetadataFetch(
            C::TopicAuthorizationFailed
        )));
    }
}

/// Back-off for retried start-up and restore steps: 100 ms doubling to
/// 5 s.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    next: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: std::time::Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The wait before the next try, growing each call.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(std::time::Duration::from_secs(5));
        d
    }
}
