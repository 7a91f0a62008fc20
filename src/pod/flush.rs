//! The flush, driven by `tally_core::cycle::Cycle`: this file performs the
//! cycle's actions (send, write, commit, durable, purge, forget) and feeds
//! it the results. The order and the rules are the cycle's: outputs
//! acknowledged, then the changelog group by group, then one synced
//! RocksDB batch, then the Kafka commit.

use super::*;

/// How long a flush waiting for acknowledgements sleeps when none came:
/// short next to a broker's round trip, long next to a poll.
const ACK_WAIT: Duration = Duration::from_micros(200);

/// The batch in flight: its records' bytes, by the cycle's tag index.
pub(super) struct Sealed {
    pub(super) id: BatchId,
    pub(super) outputs: Vec<OutRecord>,
    /// The encoded state changes, in changelog order: the changelog
    /// records are sent from these bytes (no copy a record), and the same
    /// bytes are written to RocksDB.
    pub(super) changes: Vec<Encoded>,
    /// Changes for RocksDB only ([`StateChange::in_changelog`]): written
    /// with the batch, never sent.
    pub(super) local: Vec<Encoded>,
    /// The highest changelog offset acknowledged per partition.
    pub(super) changelog_max: BTreeMap<Partition, i64>,
    /// Each partition's `tally-writer` header value.
    pub(super) writers: BTreeMap<Partition, Vec<u8>>,
    /// Each partition's next input offset as of the seal: what the batch
    /// makes durable, and so what may be committed (records processed
    /// after the seal belong to the next batch).
    pub(super) offsets: BTreeMap<Partition, i64>,
    /// The counts of the records the batch holds, added to the metrics
    /// when it is done: records processed after the seal belong to the
    /// next batch's counts, so `tally_records_consumed_total` never runs
    /// ahead of what is durable.
    pub(super) counts: Counts,
    /// When the flush started, and when its engine phase ended.
    pub(super) started: Instant,
    pub(super) sealed_at: Instant,
    /// When waiting longer for its acknowledgements counts as a failed
    /// flush (moved on by one budget each time it does).
    pub(super) deadline: Instant,
}

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

fn partition_of(c: &StateChange) -> Partition {
    match c {
        StateChange::Put(p, _) | StateChange::Delete(p, _) => *p,
    }
}

impl Processor {
    /// Drives the flush until its batch is committed or `budget` runs
    /// out: the blocking flush, for a revoke, a shutdown, and a batch
    /// being collected that is full while the last one is still in
    /// flight. The first call seals the collecting batch; a call after a
    /// timeout goes on with the same sealed batch (records made meanwhile
    /// belong to the next one). On a timeout nothing of the batch is
    /// written or committed.
    pub(super) fn flush(
        &mut self,
        consumer: &BaseConsumer<PodContext>,
        budget: Duration,
    ) -> Result<(), PodError> {
        let span =
            info_span!("flush", topic = %self.cfg.topics.input_topic, records = self.pending);
        let _g = span.enter();
        let deadline = Instant::now() + budget;
        if self.sealed.is_none() {
            self.seal(budget)?;
        }
        loop {
            self.drive(consumer)?;
            if self.sealed.is_none() {
                break;
            }
            if Instant::now() >= deadline {
                self.metrics.flush_failures.inc();
                return Err(PodError::ProduceTimeout(self.last_flush.elapsed()));
            }
            // Not `Producer::flush`, nor a short `poll(t)`: in rdkafka
            // 0.39 `BaseProducer::poll(t)` runs for the whole of `t`, and
            // the remainder it waits on is cut to whole milliseconds, so
            // under 1 ms it polls without blocking: `poll(1 ms)` spun for
            // the whole millisecond, and the pod thread burnt its CPU
            // waiting for acknowledgements (a profile of the job: a fifth
            // of the process in clock reads from rdkafka's deadline). A
            // zero poll serves one event without waiting; with nothing to
            // serve, the thread sleeps a moment instead.
            self.producer.poll(Duration::ZERO);
            if self.take_reports() == 0 {
                std::thread::sleep(ACK_WAIT);
            }
            self.cycle.resume_sending();
        }
        Ok(())
    }

    /// The pipelined flush: one step, never waiting. Seals the collecting
    /// batch when it is due and none is in flight, then hands the
    /// delivery reports so far to the cycle and performs what it asks
    /// for. The pod goes on processing records between steps, into the
    /// next batch, while this one waits for its acknowledgements (stopping
    /// the pod thread for the whole flush cost a third of its time in
    /// the throughput scenario). One batch at most is in
    /// flight (the cycle's rule), so a flush that takes longer than the
    /// interval delays the next seal, never overlaps it. Returns
    /// `ProduceTimeout` once per `budget` the sealed batch waits.
    pub(super) fn flush_step(
        &mut self,
        consumer: &BaseConsumer<PodContext>,
        budget: Duration,
    ) -> Result<(), PodError> {
        if self.sealed.is_none() {
            if !self.due() {
                return Ok(());
            }
            let span =
                info_span!("flush", topic = %self.cfg.topics.input_topic, records = self.pending);
            let _g = span.enter();
            self.seal(budget)?;
        }
        self.producer.poll(Duration::ZERO);
        self.take_reports();
        self.cycle.resume_sending();
        if self.sealed.is_some()
            && self.last_emit.elapsed() >= Duration::from_millis(self.cfg.flush.flush_interval_ms)
        {
            self.announce();
        }
        self.drive(consumer)?;
        if let Some(s) = self.sealed.as_mut() {
            if Instant::now() >= s.deadline {
                s.deadline += budget;
                self.metrics.flush_failures.inc();
                return Err(PodError::ProduceTimeout(s.started.elapsed()));
            }
        }
        Ok(())
    }

    /// While a batch is in flight, once per flush interval: the open
    /// window results that changed since they were last emitted go out
    /// with the batch being collected (registered with the cycle like any
    /// output, so they are acknowledged before that batch's changelog),
    /// and so does each partition's progress. Why: otherwise results wait
    /// for the next seal, and the next seal for the last flush to be
    /// durable, four broker round trips that take well over the interval
    /// on a busy broker; see `Engine::announce`.
    fn announce(&mut self) {
        self.last_emit = Instant::now();
        self.engine.announce(&mut self.effects);
        self.emit_engine();
        self.publish_progress();
    }

    /// After a batch is done (or abandoned): its counts to the metrics,
    /// and the lag.
    fn finish(&mut self, consumer: &BaseConsumer<PodContext>, f: Sealed) {
        self.report(f.counts, f.started);
        self.update_lag(consumer);
        debug!(
            topic = %self.cfg.topics.input_topic,
            engine_us = (f.sealed_at - f.started).as_micros() as u64,
            acks_write_commit_us = f.sealed_at.elapsed().as_micros() as u64,
            "flushed"
        );
    }

    /// Flushes until nothing is pending: the batch in flight, then what was
    /// collected meanwhile (on revoke and shutdown, so the next owner
    /// starts from everything this pod did), within `budget`.
    pub(super) fn flush_all(
        &mut self,
        consumer: &BaseConsumer<PodContext>,
        budget: Duration,
    ) -> Result<(), PodError> {
        let deadline = Instant::now() + budget;
        loop {
            let was_continuation = self.sealed.is_some();
            self.flush(consumer, deadline.saturating_duration_since(Instant::now()))?;
            if !was_continuation || (self.out.is_empty() && self.pending == 0) {
                return Ok(());
            }
        }
    }

    /// Drains the engine (effects and state changes) and seals the
    /// collecting batch with them: its outputs were sent as they were
    /// made; its changelog records go once they are acknowledged, in the
    /// core's ordering groups.
    fn seal(&mut self, budget: Duration) -> Result<(), PodError> {
        let started = Instant::now();
        // The interval runs from flush start to flush start: a flush that
        // takes 50 ms of a 100 ms interval does not stretch the cycle to
        // 150 ms (every window update would wait that much longer).
        self.last_flush = started;
        self.last_emit = started;
        // Records from here on belong to the next batch.
        self.pending = 0;
        let counts = std::mem::take(&mut self.unreported);
        let mut changes = Vec::new();
        let id = self.engine.flush(&mut self.effects, &mut changes);
        self.emit_engine();
        self.publish_progress();
        // Stable: within a group the engine's order stays.
        changes.sort_by_key(StateChange::group);
        let (changes, local): (Vec<StateChange>, Vec<StateChange>) =
            changes.into_iter().partition(StateChange::in_changelog);
        let local = local.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let groups: Vec<(Partition, usize)> = changes
            .iter()
            .map(|c| (partition_of(c), c.group()))
            .collect();
        let encoded = changes.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let offsets: BTreeMap<Partition, i64> = self
            .engine
            .partitions()
            .map(|(p, s)| (p, s.next_offset))
            .collect();
        // The `tally-writer` header value, made once for every partition
        // with a change.
        let writers: BTreeMap<Partition, Vec<u8>> = encoded
            .iter()
            .map(|(p, _, _)| *p)
            .collect::<BTreeSet<Partition>>()
            .into_iter()
            .map(|p| {
                let epoch = self.epochs.get(&p).copied().unwrap_or(0);
                let next = offsets.get(&p).copied().unwrap_or(0);
                (p, claim::writer_value(epoch, next))
            })
            .collect();
        let batch = self
            .cycle
            .seal(id, &groups)
            .map_err(|e| PodError::Cycle(format!("{e:?}")))?;
        self.sealed = Some(Sealed {
            id: batch,
            outputs: std::mem::take(&mut self.out),
            changes: encoded,
            local,
            changelog_max: BTreeMap::new(),
            writers,
            offsets,
            counts,
            started,
            deadline: started + budget,
            sealed_at: Instant::now(),
        });
        Ok(())
    }

    /// Hands the queued delivery reports to the cycle.
    /// Hands the delivery reports served so far to the cycle; returns how
    /// many there were.
    pub(super) fn take_reports(&mut self) -> usize {
        let mut reports = std::mem::take(&mut self.reports);
        self.producer.context().take(&mut reports);
        let n = reports.len();
        for r in reports.drain(..) {
            if let (Some((p, o)), Some(s)) = (r.landed, self.sealed.as_mut()) {
                if r.tag.batch == s.id {
                    let e = s.changelog_max.entry(p).or_insert(o);
                    *e = (*e).max(o);
                }
            }
            self.cycle.delivered(r.tag, r.ok);
        }
        self.reports = reports;
        n
    }

    /// The record a tag names, as the producer takes it; `None` for a
    /// batch that is gone.
    fn record(&self, tag: Tag) -> Option<BaseRecord<'_, [u8], [u8], usize>> {
        let opaque = tag.to_opaque();
        if tag.batch == self.cycle.collecting() {
            return self
                .out
                .get(tag.index as usize)
                .map(|r| base_record(r, opaque));
        }
        let s = self.sealed.as_ref().filter(|s| s.id == tag.batch)?;
        match tag.lane {
            Lane::Outputs => s
                .outputs
                .get(tag.index as usize)
                .map(|r| base_record(r, opaque)),
            Lane::Changelog => {
                let (p, key, value) = s.changes.get(tag.index as usize)?;
                // Every changelog record names its writer's ownership
                // epoch and the input offset it reflects, so restore can
                // tell a stale writer's (the seal made the value for every
                // partition with a change).
                let writer = s.writers.get(p)?;
                let mut r: BaseRecord<'_, [u8], [u8], usize> =
                    BaseRecord::with_opaque_to(&self.cfg.topics.changelog_topic, opaque)
                        .partition(*p)
                        .key(key.as_slice())
                        .headers(OwnedHeaders::new().insert(Header {
                            key: claim::WRITER_HEADER,
                            value: Some(writer.as_slice()),
                        }));
                if let Some(v) = value {
                    r = r.payload(v.as_slice());
                }
                Some(r)
            }
        }
    }

    /// Performs the cycle's actions until it has none.
    pub(super) fn drive(&mut self, consumer: &BaseConsumer<PodContext>) -> Result<(), PodError> {
        while let Some(action) = self.cycle.poll_action() {
            match action {
                Action::Send(tag) => self.send_one(tag)?,
                Action::Write(id, parts) => {
                    let Some(s) = self.sealed.as_ref().filter(|s| s.id == id) else {
                        continue;
                    };
                    let checkpoints: Vec<(Partition, i64)> = s
                        .changelog_max
                        .iter()
                        .filter(|(p, _)| parts.contains(p))
                        .map(|(p, o)| (*p, *o))
                        .collect();
                    // A partition revoked mid-flush: its rows stay out.
                    let kept = s
                        .changes
                        .iter()
                        .chain(&s.local)
                        .filter(|c| parts.contains(&c.0));
                    self.store
                        .write_encoded_at(kept, &checkpoints, Some(now_ms()))?;
                    self.cycle.written(id);
                }
                Action::Commit(id, parts) => {
                    let fenced = match self.sealed.as_ref().filter(|s| s.id == id) {
                        Some(s) => self.commit(consumer, &parts, &s.offsets),
                        None => false,
                    };
                    self.cycle.committed(id);
                    if fenced {
                        self.fenced_out(consumer, &parts);
                    }
                }
                Action::Durable(flush) => {
                    let mut reader = StoreReader::new(&self.store);
                    self.engine.on_durable_in(flush, &mut reader);
                    reader.result()?;
                }
                Action::Purge => {
                    // Queued records only: purging in-flight ones would void
                    // their acks, and they are ignored by the cycle anyway.
                    self.producer.purge(PurgeConfig::default().queue());
                    info!("producer queue purged after a revoke");
                }
                Action::Forget(id) => {
                    if let Some(s) = self.sealed.take_if(|s| s.id == id) {
                        self.finish(consumer, s);
                    }
                }
            }
        }
        Ok(())
    }

    fn send_one(&mut self, tag: Tag) -> Result<(), PodError> {
        let Some(rec) = self.record(tag) else {
            return Ok(());
        };
        match self.producer.send(rec) {
            Ok(()) => self.cycle.sent(tag),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                self.cycle.refused(tag)
            }
            Err((e, _)) => return Err(e.into()),
        }
        Ok(())
    }

    /// Offers the outputs the cycle queued as they were made, without
    /// waiting, so librdkafka batches and delivers them while the pod goes
    /// on processing and the flush waits only for the last acks. A full
    /// queue is not an error here: what is refused now, the flush sends.
    /// Stops at the first action that is not a send (those need the
    /// consumer and belong to the flush).
    pub(super) fn send_new(&mut self) -> Result<(), PodError> {
        while let Some(Action::Send(tag)) = self.cycle.peek_action().cloned() {
            self.cycle.poll_action();
            self.send_one(tag)?;
        }
        Ok(())
    }

    /// Drops every pending record of `partitions` (revoked): nothing more
    /// is sent, written or committed for them.
    pub(super) fn drop_pending(
        &mut self,
        consumer: &BaseConsumer<PodContext>,
        partitions: &[Partition],
    ) {
        self.cycle.revoke(partitions);
        if let Err(e) = self.drive(consumer) {
            warn!(error = %e, "after a revoke");
        }
    }

    /// Commits the batch's offsets. Returns whether the group refused the
    /// commit because it went on without this pod (unknown member, an
    /// older generation): then the partitions may have had other owners
    /// meanwhile ([`Processor::fenced_out`]).
    pub(super) fn commit(
        &self,
        consumer: &BaseConsumer<PodContext>,
        parts: &[Partition],
        offsets: &BTreeMap<Partition, i64>,
    ) -> bool {
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            if let Some(&next) = offsets.get(p).filter(|o| **o > 0) {
                let _ = tpl.add_partition_offset(
                    &self.cfg.topics.input_topic,
                    *p,
                    Offset::Offset(next),
                );
            }
        }
        if tpl.count() == 0 {
            return false;
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => false,
            Err(e) => {
                // Not fatal: RocksDB holds the offsets and wins on restart.
                self.metrics.commit_failures.inc();
                warn!(error = %e, "offset commit failed; will commit again after the next flush");
                matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownMemberId
                            | RDKafkaErrorCode::IllegalGeneration
                            | RDKafkaErrorCode::FencedInstanceId
                    )
                )
            }
        }
    }

    /// The group refused a commit because it went on without this pod: the
    /// partitions may have had other owners since, and what this batch
    /// just wrote to RocksDB (its checkpoint too) may lie after a newer
    /// owner's claim, where no later tail restore looks (the soak
    /// once had a pod out of the group for five seconds behind a slow broker
    /// flush once more: its checkpoint became the changelog's end, and
    /// its next restore read nothing; sessions lost orders). Handled like
    /// a lost assignment, before the group says so: pending work dropped,
    /// the partitions released and paused, their local state cleared, so
    /// the next assignment restores them in full. Kafka Streams likewise
    /// closes such tasks dirty.
    pub(super) fn fenced_out(&mut self, consumer: &BaseConsumer<PodContext>, parts: &[Partition]) {
        warn!(partitions = ?parts, "commit refused: the group went on without this pod; releasing the partitions and clearing their local state");
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            tpl.add_partition(&self.cfg.topics.input_topic, *p);
        }
        if let Err(e) = consumer.pause(&tpl) {
            warn!(error = %e, "pausing the fenced partitions failed");
        }
        self.cycle.revoke(parts);
        for p in parts {
            if let Err(e) = discard_local_state(&self.metrics, &self.store, *p, "fenced_commit") {
                error!(partition = p, error = %e, "cannot clear the fenced partition's local state");
            }
            self.release_partition(*p);
        }
    }
}
