//! The embedded broker: librdkafka's mock cluster, which speaks the real
//! Kafka protocol on loopback ports, so other processes can use it too.
//! For `tally demo`, `tally broker` and tests; not for production.

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};

use crate::kafka::topics::TopicSpec;

pub struct EmbeddedBroker {
    /// The client that owns the cluster: created with `test.mock.num.brokers`,
    /// the cluster lives as long as it does.
    owner: BaseProducer<DefaultProducerContext>,
    bootstrap: String,
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers and creates `topics` (the mock
    /// cluster has no CreateTopics API, so they are created directly).
    ///
    /// The group coordinator's initial rebalance delay (3 s by default, like
    /// Kafka's `group.initial.rebalance.delay.ms`) is set to zero, so a pod
    /// that joins an empty group is assigned partitions at once.
    pub fn start(brokers: i32, topics: &[TopicSpec]) -> Result<EmbeddedBroker, KafkaError> {
        let owner: BaseProducer<DefaultProducerContext> = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()?;
        let cluster = owner
            .client()
            .mock_cluster()
            .ok_or(KafkaError::MockCluster(RDKafkaErrorCode::Fail))?;
        for t in topics {
            cluster.create_topic(&t.name, t.partitions, t.replication_factor.min(brokers))?;
        }
        // SAFETY: the pointer comes from the live client that owns the mock
        // cluster, and the call only sets an integer in it.
        unsafe {
            let mc = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
            if !mc.is_null() {
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(mc, 0);
            }
        }
        let bootstrap = cluster.bootstrap_servers();
        drop(cluster);
        Ok(EmbeddedBroker { owner, bootstrap })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.bootstrap.clone()
    }

    /// Makes broker `broker`'s next `n` answers to `api` fail with `error`;
    /// the other brokers answer as usual (the cluster-wide
    /// `MockCluster::request_errors` hits every client, tests' readers too).
    pub fn broker_request_errors(
        &self,
        broker: i32,
        api: rdkafka::types::RDKafkaApiKey,
        error: rdkafka::types::RDKafkaRespErr,
        n: usize,
    ) {
        // SAFETY: the pointer comes from the live client that owns the mock
        // cluster; each call pushes one (error, rtt) pair, as the variadic
        // signature takes `cnt` pairs.
        unsafe {
            let mc =
                rdkafka::bindings::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr());
            if mc.is_null() {
                return;
            }
            for _ in 0..n {
                rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                    mc,
                    broker,
                    api as i16,
                    1,
                    error,
                    0 as std::os::raw::c_int,
                );
            }
        }
    }

    /// The cluster itself, for fault injection in tests.
    pub fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.owner
            .client()
            .mock_cluster()
            .unwrap_or_else(|| unreachable!("the owner was created with a mock cluster"))
    }
}
