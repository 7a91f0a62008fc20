//! The embedded broker: librdkafka's mock cluster, which speaks the real
//! Kafka protocol on a loopback port, so other processes can use it too.
//! For `tally demo`, `tally broker` and tests; not for production.

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::topics::TopicSpec;

pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    /// Starts a cluster of `brokers` brokers and creates `topics` (the mock
    /// cluster has no CreateTopics API, so they are created directly).
    pub fn start(brokers: i32, topics: &[TopicSpec]) -> Result<EmbeddedBroker, KafkaError> {
        let cluster = MockCluster::new(brokers)?;
        for t in topics {
            cluster.create_topic(&t.name, t.partitions, t.replication_factor.min(brokers))?;
        }
        Ok(EmbeddedBroker { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The cluster itself, for fault injection in tests.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
