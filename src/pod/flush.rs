//! The flush: outputs, then changelog, then one synced RocksDB batch, then
//! the Kafka commit.

use super::*;

pub(super) fn base_record(rec: &OutRecord, opaque: usize) -> BaseRecord<'_, [u8], [u8], usize> {
    let mut r: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(&rec.topic, opaque);
    if let Some(p) = rec.partition {
        r = r.partition(p);
    }
    if let Some(k) = &rec.key {
        r = r.key(k.as_slice());
    }
    if let Some(p) = &rec.payload {
        r = r.payload(p.as_slice());
    }
    if !rec.headers.is_empty() {
        let mut h = OwnedHeaders::new();
        for (k, v) in &rec.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        r = r.headers(h);
    }
    r
}

/// Sends one record of `lane`, waiting out a full queue until `deadline`.
pub(super) fn send(
    producer: &BaseProducer<AckContext>,
    rec: &OutRecord,
    lane: Lane,
    i: usize,
    deadline: Instant,
) -> Result<(), PodError> {
    loop {
        match producer.send(base_record(rec, lane.opaque(i))) {
            Ok(()) => {
                let mut acks = producer.context().lane(lane);
                if let Some(slot) = acks.status.get_mut(i) {
                    let was = std::mem::replace(slot, IN_FLIGHT);
                    if was == FAILED {
                        acks.failed -= 1;
                    }
                }
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if Instant::now() >= deadline {
                    return Err(PodError::ProduceTimeout(Duration::ZERO));
                }
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

impl Processor {
    /// The flush: outputs acknowledged, then one RocksDB batch, then the
    /// Kafka commit. On a produce timeout nothing is written or committed,
    /// and the next call retries the same outputs.
    pub(super) fn flush(
        &mut self,
        consumer: &BaseConsumer<PodContext>,
        budget: Duration,
    ) -> Result<(), PodError> {
        let span =
            info_span!("flush", topic = %self.cfg.topics.input_topic, records = self.pending);
        let _g = span.enter();
        let started = Instant::now();
        if !self.retrying {
            let mut changes = Vec::new();
            let id = self.engine.flush(&mut self.effects, &mut changes);
            self.emit_engine();
            self.publish_progress();
            // The window updates leave first: encoding the state rows is
            // not on the path of what a reader sees.
            self.send_new();
            // Each changed row goes to the changelog, but only after every
            // output is acknowledged: the changelog must never be ahead of
            // the outputs, or a pod restoring from it would skip records
            // whose outputs were lost. Then to RocksDB.
            let encoded = changes.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
            for (p, key, value) in &encoded {
                self.changelog_out.push(OutRecord {
                    topic: self.cfg.topics.changelog_topic.clone(),
                    partition: Some(*p),
                    key: Some(key.clone()),
                    payload: value.clone(),
                    headers: Vec::new(),
                });
            }
            self.pending_changes = Some((id, encoded));
            self.producer
                .context()
                .lane(Lane::Changelog)
                .reset(self.changelog_out.len());
            if let Ok(mut m) = self.producer.context().changelog_max.lock() {
                m.clear();
            }
        }
        let produce_started = Instant::now();
        if !self.outputs_acked {
            if let Err(e) = self.produce_all(Lane::Outputs, &self.out, started + budget) {
                return Err(self.flush_failed(e));
            }
            self.outputs_acked = true;
        }
        if let Err(e) = self.produce_all(Lane::Changelog, &self.changelog_out, started + budget) {
            return Err(self.flush_failed(e));
        }
        self.retrying = false;
        self.outputs_acked = false;
        let Some((id, changes)) = self.pending_changes.take() else {
            return Ok(());
        };
        let produced = produce_started.elapsed();
        let checkpoints: Vec<(Partition, i64)> = self
            .producer
            .context()
            .changelog_max
            .lock()
            .map(|m| m.iter().map(|(p, o)| (*p, *o)).collect())
            .unwrap_or_default();
        self.store.write_encoded(&changes, &checkpoints)?;
        let written = produce_started.elapsed();
        self.commit(consumer);
        self.engine.on_durable(id);
        add(&self.stats.flushes, 1);
        self.report(started);
        self.update_lag(consumer);
        debug!(
            outputs = self.out.len(),
            rows = changes.len(),
            engine_us = (produce_started - started).as_micros() as u64,
            produce_us = produced.as_micros() as u64,
            write_us = (written - produced).as_micros() as u64,
            commit_us = (produce_started.elapsed() - written).as_micros() as u64,
            "flushed"
        );
        self.clear_batch();
        self.pending = 0;
        // The interval runs from flush start to flush start: a flush that
        // takes 50 ms of a 100 ms interval does not stretch the cycle to
        // 150 ms (every window update would wait that much longer).
        self.last_flush = started;
        Ok(())
    }

    /// A flush that could not get its records acknowledged: the next call
    /// retries the same batch.
    pub(super) fn flush_failed(&mut self, e: PodError) -> PodError {
        self.retrying = true;
        add(&self.stats.flush_failures, 1);
        self.metrics.flush_failures.inc();
        e
    }

    /// Offers the outputs made since the last call to the producer, so
    /// librdkafka batches and delivers them while the pod goes on
    /// processing, and the flush waits only for the last acks. Sending early
    /// changes nothing about delivery: outputs were always at-least-once,
    /// and nothing is committed before every output is acknowledged. A full
    /// queue is not an error here: what is not sent now, the flush sends.
    pub(super) fn send_new(&mut self) {
        let (start, end) = (self.out_offered, self.out.len());
        if start == end {
            return;
        }
        self.out_offered = end;
        let mut acks = self.producer.context().lane(Lane::Outputs);
        acks.status.resize(end, PENDING);
        if self.send_blocked {
            return;
        }
        // Holding the lane is safe: `send` never runs delivery callbacks
        // (only `poll` does, on this thread).
        for i in start..end {
            match self
                .producer
                .send(base_record(&self.out[i], Lane::Outputs.opaque(i)))
            {
                Ok(()) => acks.status[i] = IN_FLIGHT,
                Err(_) => {
                    self.send_blocked = true;
                    break;
                }
            }
        }
    }

    /// Sends every record of `lane` not yet acknowledged and waits for the
    /// acks; failed ones are sent again, until `deadline`.
    pub(super) fn produce_all(
        &self,
        lane: Lane,
        records: &[OutRecord],
        deadline: Instant,
    ) -> Result<(), PodError> {
        let ctx = self.producer.context();
        loop {
            let todo: Vec<usize> = {
                let mut acks = ctx.lane(lane);
                acks.status.resize(records.len(), PENDING);
                acks.status
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| **s == PENDING || **s == FAILED)
                    .map(|(i, _)| i)
                    .collect()
            };
            for i in todo {
                send(&self.producer, &records[i], lane, i, deadline)?;
            }
            // Not `Producer::flush`: in rdkafka 0.39 `BaseProducer::poll(t)`
            // always runs for the whole of `t`, so `flush` waits out a 100 ms
            // poll on every call. Short polls return as soon as the last
            // delivery report is served.
            loop {
                let (acked, failed) = {
                    let acks = ctx.lane(lane);
                    (acks.acked, acks.failed)
                };
                if acked >= records.len() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(PodError::ProduceTimeout(self.last_flush.elapsed()));
                }
                if failed > 0 {
                    break;
                }
                self.producer.poll(Duration::from_millis(1));
            }
        }
    }

    /// Forgets the batch's records and their delivery state.
    pub(super) fn clear_batch(&mut self) {
        self.out.clear();
        self.changelog_out.clear();
        self.out_offered = 0;
        self.send_blocked = false;
        let ctx = self.producer.context();
        ctx.lane(Lane::Outputs).reset(0);
        ctx.lane(Lane::Changelog).reset(0);
    }

    pub(super) fn commit(&self, consumer: &BaseConsumer<PodContext>) {
        let mut tpl = TopicPartitionList::new();
        for p in &self.held {
            if let Some(s) = self.engine.status(*p) {
                if s.next_offset > 0 {
                    let _ = tpl.add_partition_offset(
                        &self.cfg.topics.input_topic,
                        *p,
                        Offset::Offset(s.next_offset),
                    );
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            // Not fatal: RocksDB holds the offsets and wins on restart.
            add(&self.stats.commit_failures, 1);
            self.metrics.commit_failures.inc();
            warn!(error = %e, "offset commit failed; will commit again after the next flush");
        }
    }
}
