//! Assign and revoke: the consumer context's rebalance callback and
//! releasing a partition.

use super::*;

/// The consumer's context: rebalance callbacks flush and restore.
pub struct PodContext {
    pub(super) proc: Arc<Mutex<Processor>>,
    pub(super) input_topic: String,
    pub(super) stats: Arc<Stats>,
    pub(super) callback_budget: Duration,
}

impl ClientContext for PodContext {}

impl ConsumerContext for PodContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<Partition> = tpl
            .elements_for_topic(&self.input_topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut proc = lock(&self.proc);
                proc.metrics.rebalances.with_label_values(&["assign"]).inc();
                for p in &partitions {
                    let offset = proc.begin_take(*p);
                    let _ = tpl.set_partition_offset(&self.input_topic, *p, offset);
                }
                drop(proc);
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    error!(error = %e, "assign failed");
                }
                // Nothing is fetched for these partitions until their
                // restore, in the main loop, is done.
                if let Err(e) = consumer.pause(tpl) {
                    error!(error = %e, "pause for restore failed");
                }
                self.stats.joined.store(true, Ordering::SeqCst);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut proc = lock(&self.proc);
                // Lost, not revoked: the group went on without this pod (a
                // session timeout while it waited on a slow broker), so
                // the partitions have had other owners, and whatever this
                // pod wrote meanwhile was a stale writer's.
                let lost = consumer.assignment_lost();
                proc.metrics
                    .rebalances
                    .with_label_values(&[if lost { "lost" } else { "revoke" }])
                    .inc();
                if lost {
                    // No flush: it would only write more stale records. And
                    // the local state goes: it holds this pod's writes made
                    // after another owner claimed the partition, and its
                    // checkpoint would make the next restore skip that
                    // owner's records (the soak lost orders that way).
                    warn!(partitions = ?partitions, "partitions lost (this pod was out of the group); dropping its pending work and its local state of them");
                    for p in &partitions {
                        if let Err(e) =
                            discard_local_state(&proc.metrics, &proc.store, *p, "lost_assignment")
                        {
                            error!(partition = p, error = %e, "cannot clear the lost partition's local state");
                        }
                    }
                } else if self.stats.failure().is_some() {
                    // Nothing decided after the failure may be written:
                    // the next owner redoes the work from the durable
                    // offsets, as after a SIGKILL.
                    warn!(partitions = ?partitions, "releasing without a flush: the engine thread failed");
                } else if let Err(e) = proc.flush_all(consumer, self.callback_budget) {
                    // Bounded, so a rebalance never outlives
                    // max.poll.interval.ms. If outputs cannot be
                    // acknowledged in time, the partition is released
                    // without a commit: its next owner resumes from the
                    // last committed (durable) offsets, so nothing is lost.
                    warn!(error = %e, "flush on revoke did not finish in time; releasing without a commit");
                }
                // Whatever is still pending for them is dropped: nothing
                // more is sent, written or committed for a released
                // partition (its next owner redoes it from the durable
                // offsets).
                proc.drop_pending(consumer, &partitions);
                for p in &partitions {
                    proc.release_partition(*p);
                }
                drop(proc);
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    error!(error = %e, "unassign failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

impl Processor {
    pub(super) fn release_partition(&mut self, p: Partition) {
        if self.restoring.remove(&p).is_some() {
            self.restoring_changed();
            let _ = self
                .metrics
                .restore_remaining
                .remove_label_values(&[&p.to_string()]);
        }
        self.engine.revoke(p);
        self.cycle.revoke(&[p]);
        self.seeks.remove(&p);
        self.resumes.remove(&p);
        self.epochs.remove(&p);
        if self.refused.remove(&p) {
            if let Ok(mut b) = self.stats.blocked.lock() {
                b.retain(|(q, _)| *q != p);
            }
        }
        self.held.remove(&p);
        self.published.remove(&p);
        self.held_changed();
        let label = p.to_string();
        let _ = self.metrics.watermark.remove_label_values(&[&label]);
        let _ = self.metrics.watermark_delay.remove_label_values(&[&label]);
        let _ = self
            .metrics
            .log_end_offset
            .remove_label_values(&[&self.cfg.topics.input_topic, &label]);
        let _ = self.metrics.consumergroup_lag.remove_label_values(&[
            &self.cfg.kafka.group,
            &self.cfg.topics.input_topic,
            &label,
        ]);
        info!(partition = p, "partition released");
    }
}
