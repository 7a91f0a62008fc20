//! Restoring an assigned partition from the changelog into RocksDB, then
//! into the engine.

use super::*;

/// The clients of a run of restores, one partition at a time: made at
/// the first restore step, dropped once nothing is restoring.
pub(super) struct RestoreClients {
    /// Reads the changelog partition being restored, in order.
    pub(super) reader: BaseConsumer,
    /// Finds where the changelog partition really ends (`true_end`).
    pub(super) probe: BaseConsumer,
}

/// The progress of one partition's restore from the changelog.
pub(super) struct Restoring {
    pub(super) started: Instant,
    /// The shared reader is set up for this partition (at its first
    /// step; cleared to start over).
    pub(super) reading: bool,
    /// The changelog's end when the restore began (exclusive).
    pub(super) high: i64,
    /// The last changelog offset applied to the store.
    pub(super) last: i64,
    /// Records applied so far.
    pub(super) count: u64,
    /// The restore failed: the partition is rebuilt from the input log.
    pub(super) failed: bool,
    /// After a transient error: not before this instant, with this back-off.
    pub(super) retry_at: Option<Instant>,
    pub(super) backoff: crate::kafka::Backoff,
    /// The highest writer epoch applied so far (restore ignores records
    /// of an older epoch after it: a stale writer's).
    pub(super) max_epoch: u64,
    /// Reading only the tail after the local state's checkpoint.
    pub(super) tail: bool,
    /// How many times the changelog was seen to start too late: a log
    /// start is asked for again before it is believed (the soak saw a
    /// start equal to the end once, and the partition was rebuilt).
    pub(super) truncated_seen: u32,
    /// A record of another format was read: nothing after it is applied,
    /// and unless a rebuild's reset follows it (the rows before a reset
    /// do not count), the partition is rebuilt once the end is reached.
    pub(super) poisoned: Option<CodecError>,
}

impl Restoring {
    pub(super) fn new() -> Restoring {
        Restoring {
            started: Instant::now(),
            reading: false,
            high: 0,
            last: -1,
            count: 0,
            failed: false,
            retry_at: None,
            backoff: crate::kafka::Backoff::default(),
            max_epoch: 0,
            tail: false,
            truncated_seen: 0,
            poisoned: None,
        }
    }
}

impl Processor {
    /// Advances the restore of one queued partition for at most `budget`,
    /// outside the rebalance callback: the main loop keeps polling the group
    /// between steps, so a long restore cannot stall a rebalance or exceed
    /// `max.poll.interval.ms`.
    pub(super) fn restore_step(&mut self, consumer: &BaseConsumer<PodContext>, budget: Duration) {
        let Some(p) = self.restoring.keys().next().copied() else {
            return;
        };
        if self.restoring[&p]
            .retry_at
            .is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        let deadline = Instant::now() + budget;
        let done = match self.catch_up_from_changelog(p, deadline) {
            Ok(done) => done,
            Err(PodError::LocalStateStale {
                partition,
                stored,
                found,
            }) => {
                warn!(partition, stored_epoch = stored, found_epoch = found, "the local state was written after another owner claimed the partition; restoring it in full from the changelog");
                if let Err(e) = discard_local_state(&self.metrics, &self.store, p, "stale_writer") {
                    error!(partition = p, error = %e, "cannot clear the partition's local state");
                }
                if let Some(r) = self.restoring.get_mut(&p) {
                    r.reading = false;
                }
                false
            }
            Err(e @ PodError::OtherDefinitions { .. }) => {
                // Nothing of it may be used: what the restore stored so
                // far goes, and the partition stays paused until an
                // operator runs the definitions where they belong.
                if let Err(e) = self.store.clear_partition(p) {
                    error!(partition = p, error = %e, "cannot clear the partition's local state");
                }
                self.refuse(p, e.to_string());
                return;
            }
            Err(e) if e.is_transient() || matches!(e, PodError::Kafka(_)) => {
                // A leader moving, a timeout, brokers down: the state is
                // fine, the broker is not. Try again later from where the
                // store is (rows and checkpoint advance together); never
                // throw the state away for it. Any error of the Kafka
                // client is the broker's or the network's, never a sign
                // that the state is inconsistent: even one not known to be
                // transient is retried (with back-off, a log line and
                // `tally_restore_retries_total`), not answered by a rebuild.
                self.restore_stalled(p, "reading the changelog", &e);
                false
            }
            Err(e) => {
                // A real inconsistency (a record of another format, a
                // store error, a changelog that lost records). A partial
                // restore must not mix with a rebuild: start the
                // partition over from an empty store.
                error!(partition = p, error = %e, "cannot restore the partition's state; rebuilding it from the log");
                if let Err(e) = self.store.clear_partition(p) {
                    error!(partition = p, error = %e, "cannot clear the partition's local state");
                }
                if let Some(r) = self.restoring.get_mut(&p) {
                    r.reading = false;
                    r.failed = true;
                }
                true
            }
        };
        if !done {
            return;
        }
        let failed = self.restoring.get(&p).is_some_and(|r| r.failed);
        if failed {
            // A rebuild from the input log is exact only if the log still
            // starts where the partition's processing started (offset 0):
            // otherwise the orders before its start would be lost without
            // a word. Refuse, and say so.
            let topic = self.cfg.topics.input_topic.clone();
            match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
                Ok((low, _)) if low > 0 => {
                    self.refuse_rebuild(p, low);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    self.restore_stalled(p, "reading the input log's start", &e.into());
                    return;
                }
            }
        }
        // Announce this pod's ownership epoch before processing anything:
        // above every epoch the changelog has shown (and not below the
        // clock), so any later record of an earlier owner is recognisably
        // stale.
        let predecessor = self.restoring.get(&p).map_or(0, |r| r.max_epoch);
        let epoch = claim::next_epoch(predecessor, now_ms());
        let rebuild = self.restoring.get(&p).is_some_and(|r| r.failed);
        let claimed = self
            .claims
            .claim(p, epoch, predecessor, Duration::from_secs(5));
        // A rebuild starts a new lineage of the state: the reset tells
        // every later restore to discard the rows before it.
        let claimed = match claimed {
            Ok(offset) if rebuild => self
                .claims
                .reset(p, epoch, predecessor, Duration::from_secs(5))
                .map(|_| offset),
            other => other,
        };
        match claimed {
            Ok(offset) => {
                if let Err(e) = self.store.set_epoch(p, epoch) {
                    error!(partition = p, error = %e, "cannot record the ownership epoch");
                }
                self.epochs.insert(p, epoch);
                info!(
                    partition = p,
                    epoch,
                    claim_offset = offset,
                    "partition claimed"
                );
            }
            Err(e) => {
                self.restore_stalled(p, "claiming the partition", &e);
                return;
            }
        }
        let Some(r) = self.restoring.remove(&p) else {
            return;
        };
        self.restoring_changed();
        self.metrics
            .restore_remaining
            .with_label_values(&[&p.to_string()])
            .set(0);
        let next = if r.failed {
            self.metrics.rebuilds.inc();
            self.engine.assign(p, now_ms());
            None
        } else {
            let engine = &self.engine;
            let loaded = self
                .store
                .load_partition_rows(p, !engine.dedup_cached(), |r| engine.restore_keeps(r))
                .and_then(|rows| {
                    let next = rows.iter().find_map(|r| match r {
                        StateRow::Meta(m) => Some(m.next_offset),
                        _ => None,
                    });
                    info!(partition = p, rows = rows.len(), from_changelog = r.count, resume_from = ?next, ms = r.started.elapsed().as_millis() as u64, "partition restored");
                    // What the restored watermark closes among the rows
                    // left in RocksDB is read from there.
                    let before = self.effects.len();
                    let mut reader = StoreReader::new(&self.store);
                    self.engine
                        .restore_in(p, rows, now_ms(), &mut self.effects, &mut reader);
                    if let Err(e) = reader.result() {
                        self.effects.truncate(before);
                        self.engine.revoke(p);
                        return Err(e);
                    }
                    Ok(next)
                });
            match loaded {
                Ok(next) => {
                    self.emit_engine();
                    next
                }
                Err(e) => {
                    error!(partition = p, error = %e, "cannot load the partition's state; rebuilding it from the log");
                    let _ = self.store.clear_partition(p);
                    self.engine.assign(p, now_ms());
                    None
                }
            }
        };
        self.held.insert(p);
        self.held_changed();
        self.metrics
            .restore_duration
            .observe(r.started.elapsed().as_secs_f64());
        // RocksDB wins over the group's committed offset; without local
        // state the partition is rebuilt from the start of the log.
        let offset = next.map_or(Offset::Beginning, Offset::Offset);
        self.seeks.insert(p, offset);
        self.retry_seeks(consumer);
    }

    /// A restore step hit a broker error: try again after a back-off, from
    /// where the store is (rows and checkpoint advance together).
    fn restore_stalled(&mut self, p: Partition, step: &str, e: &PodError) {
        self.metrics.restore_retries.inc();
        if let Some(r) = self.restoring.get_mut(&p) {
            r.reading = false;
            let wait = r.backoff.next_delay();
            r.retry_at = Some(Instant::now() + wait);
            warn!(partition = p, step, error = %e, retry_in_ms = wait.as_millis() as u64, "restore stalled on a broker error; retrying");
        }
    }

    /// Leaves partition `p` paused and unprocessed: its state cannot be
    /// restored, and the input log no longer starts at offset 0, so a
    /// rebuild would silently lose the orders before `low`. The pod stays
    /// unready and says why (`/readyz`), and the metric counts it; an
    /// operator decides (restore the changelog, or accept the loss by
    /// moving the group's offsets and clearing the state).
    fn refuse_rebuild(&mut self, p: Partition, low: i64) {
        self.metrics.rebuilds_refused.inc();
        let why = format!(
            "partition {p}: its state cannot be restored and {} starts at offset {low}, not 0: \
             a rebuild from the log would lose the orders before it",
            self.cfg.topics.input_topic
        );
        self.refuse(p, why);
    }

    /// Leaves partition `p` paused and unprocessed, the pod unready, and
    /// `why` in `/readyz`.
    fn refuse(&mut self, p: Partition, why: String) {
        error!(partition = p, "{why}; the partition stays paused");
        self.restoring.remove(&p);
        self.restoring_changed();
        self.refused.insert(p);
        if let Ok(mut b) = self.stats.blocked.lock() {
            b.retain(|(q, _)| *q != p);
            b.push((p, why));
        }
    }

    /// Whether the record at `offset` of restored partition `p` may be
    /// processed: the first one after the seek to its resume offset must
    /// be at it ([`super::resume`]). A seek again is done by
    /// [`Self::retry_seeks`], on the next turn of the loop.
    pub(super) fn check_resume(&mut self, p: Partition, offset: i64) -> bool {
        let Some(r) = self.resumes.get_mut(&p) else {
            return true;
        };
        match r.on_record(offset) {
            Step::Process => {
                self.resumes.remove(&p);
                true
            }
            Step::Drop => false,
            Step::SeekTo(to) => {
                self.metrics.resume_reseeks.inc();
                warn!(
                    partition = p,
                    resume_offset = r.expected(),
                    offset,
                    seek_to = to,
                    "the first record after the seek to the resume offset is past it \
                     (the broker skipped part of a batch); seeking again, further back"
                );
                let to = if to > 0 {
                    Offset::Offset(to)
                } else {
                    Offset::Beginning
                };
                self.seeks.insert(p, to);
                false
            }
        }
    }

    /// Seeks restored partitions to their resume offsets and resumes them.
    /// A failed seek (the fetcher not ready yet, a timeout under load)
    /// leaves the partition paused and is tried again on the next loop:
    /// resuming it unsought would read it from its assigned offset (the
    /// beginning, for a partition restored from the changelog alone), which
    /// is exact (the engine skips what its rows hold) but starts over.
    pub(super) fn retry_seeks(&mut self, consumer: &BaseConsumer<PodContext>) {
        if self.seeks.is_empty() {
            return;
        }
        let topic = self.cfg.topics.input_topic.clone();
        for (p, offset) in std::mem::take(&mut self.seeks) {
            if let Err(e) = consumer.seek(&topic, p, offset, Duration::from_secs(10)) {
                warn!(partition = p, error = %e, "seek after restore failed; trying again");
                self.seeks.insert(p, offset);
                continue;
            }
            // The first seek sets what the first record must be: the
            // resume offset (Beginning: a rebuild from the log, which
            // starts at 0, or the rebuild is refused); a seek again
            // (further back, from `check_resume`) keeps it.
            match self.resumes.get_mut(&p) {
                Some(r) => r.seeked(),
                None => {
                    if let Offset::Offset(o) = offset {
                        self.resumes.insert(p, Resume::new(o));
                    }
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, p);
            if !self.fetch_paused {
                if let Err(e) = consumer.resume(&tpl) {
                    error!(partition = p, error = %e, "resume after restore failed");
                }
            }
        }
    }

    /// Applies the changelog records of partition `p` that the local store
    /// has not seen (after its checkpoint) to the store, until `deadline`.
    /// Returns whether the partition has caught up.
    pub(super) fn catch_up_from_changelog(
        &mut self,
        p: Partition,
        deadline: Instant,
    ) -> Result<bool, PodError> {
        let topic = self.cfg.topics.changelog_topic.clone();
        let Some(r) = self.restoring.get_mut(&p) else {
            return Ok(true);
        };
        if r.failed {
            return Ok(true);
        }
        if self.restore_clients.is_none() {
            // Through the factory: a TLS or SASL cluster needs the user's
            // properties here as much as on the main consumer. Made once
            // for a run of restores, not once a partition: two clients a
            // partition were most of a restore's time (a pod restoring six
            // small partitions took 1.4 s, and the SIGKILL test's pods
            // were killed before they had processed anything).
            self.restore_clients = Some(RestoreClients {
                reader: self.clients.reader("tally-restore").create()?,
                probe: self.clients.reader("tally-restore-probe").create()?,
            });
        }
        let Some(clients) = self.restore_clients.as_ref() else {
            return Ok(true);
        };
        if !r.reading {
            let reader = &clients.reader;
            let (low, reported) = reader.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            // The end the broker reports is not trusted on its own: some
            // brokers (tansu) report one past the first offset of the last
            // record batch. The last batch itself says where the log ends.
            // On a reader of its own: records the probe fetched must not
            // reach the restore loop ahead of the tail it reads in order.
            // An empty changelog needs no probe.
            let high = if reported > low {
                true_end(&clients.probe, &topic, p, low, reported)?
            } else {
                reported
            };
            let mut checkpoint = self.store.checkpoint(p)?;
            debug!(partition = p, low, high, checkpoint = ?checkpoint, "changelog catch-up");
            // Back after a long absence: deletions made meanwhile by the
            // partition's other owners may have been compacted away, so the
            // tail after our checkpoint would not delete what they deleted
            // (closed windows, merged sessions would come back). Restore in
            // full. A state with no recorded time is as old as can be.
            let age = self.store.written_at(p)?.map(|t| now_ms() - t);
            if checkpoint.is_some()
                && age.is_none_or(|a| a > self.cfg.topics.changelog_delete_retention_ms)
            {
                warn!(partition = p, age_ms = ?age, delete_retention_ms = self.cfg.topics.changelog_delete_retention_ms, "local state is older than the changelog's tombstone retention; restoring the partition in full");
                discard_local_state(&self.metrics, &self.store, p, "long_absence")?;
                checkpoint = None;
            }
            if checkpoint.is_some_and(|c| c >= high) {
                // The local rows claim records the changelog never had: it
                // was recreated. Local state cannot be trusted; rebuild from it.
                warn!(partition = p, checkpoint = ?checkpoint, high, "local state is ahead of the changelog; discarding it");
                discard_local_state(&self.metrics, &self.store, p, "ahead_of_changelog")?;
                checkpoint = None;
            }
            // The changelog must hold every record after the local state
            // (all of it, for a full restore). Compaction never moves a
            // log's start; only deletion does (retention, delete-records,
            // a broker's size limit), and then rows whose last version
            // was deleted are gone, and so may be the claims that keep
            // epochs increasing. Neither the local tail nor a full read
            // is exact then: rebuild from the input log (or refuse).
            let needed = checkpoint.map_or(0, |c| c + 1);
            if low > needed && r.truncated_seen == 0 {
                // Asked again after a back-off before it is believed.
                r.truncated_seen += 1;
                return Err(PodError::ChangelogStartUnconfirmed {
                    partition: p,
                    needed,
                    low,
                });
            }
            if low > needed {
                return Err(PodError::ChangelogTruncated {
                    topic,
                    partition: p,
                    needed,
                    low,
                });
            }
            // A tail continues from the epoch the local rows have seen; a
            // full read starts from nothing.
            r.max_epoch = match checkpoint {
                Some(_) => self.store.epoch(p)?.unwrap_or(0),
                None => 0,
            };
            r.tail = checkpoint.is_some();
            let from = needed;
            r.high = high;
            r.last = from - 1;
            if from < high {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, p, Offset::Offset(from))?;
                reader.assign(&tpl)?;
            }
            r.reading = true;
        }
        let (high, mut last, mut max_epoch, tail) = (r.high, r.last, r.max_epoch, r.tail);
        let reader = &clients.reader;
        let mut batch: Vec<Encoded> = Vec::with_capacity(10_000);
        let mut count = 0u64;
        let mut stale = 0u64;
        let mut resets = 0u64;
        let mut caught_up = last + 1 >= high;
        let mut poisoned = r.poisoned.take();
        while !caught_up && Instant::now() < deadline {
            let Some(msg) = reader.poll(Duration::from_millis(10)) else {
                // Compaction may have removed the last offsets.
                let pos = reader.position()?;
                caught_up = pos
                    .elements_for_topic(&topic)
                    .iter()
                    .any(|e| matches!(e.offset(), Offset::Offset(o) if o >= high));
                continue;
            };
            let m = msg?;
            if m.partition() != p || m.offset() <= last {
                // The shared reader's earlier partition, or a record of an
                // earlier read of this one (librdkafka drops those after
                // an assign; this does not rely on it): not this read's.
                continue;
            }
            last = m.offset();
            let epoch = claim::epoch_of(&m);
            if epoch < max_epoch {
                // Written by an earlier owner after a later one had
                // claimed the partition: a stale writer's. Not applied.
                stale += 1;
                caught_up = last + 1 >= high;
                continue;
            }
            if poisoned.is_some() && m.key() != Some(claim::RESET_KEY) {
                // Only a reset can make up for the record of another
                // format: look for one, applying nothing.
                caught_up = last + 1 >= high;
                continue;
            }
            if matches!(m.key(), Some(k) if k == claim::CLAIM_KEY || k == claim::RESET_KEY) {
                let ours = self.engine.config().state_fingerprint();
                if let Some(found) = m.payload().and_then(claim::definitions_of) {
                    if found != ours {
                        return Err(PodError::OtherDefinitions {
                            partition: p,
                            found,
                            ours,
                        });
                    }
                }
            }
            if m.key() == Some(claim::CLAIM_KEY) {
                let predecessor = m.payload().and_then(claim::predecessor_of);
                if let Some(found) = predecessor.filter(|e| tail && *e > max_epoch) {
                    // The claimant had read an epoch this local state has
                    // never seen: an owner came between, whose claim lies
                    // before our checkpoint (we wrote on after it, a stale
                    // writer), and the tail skips its records. In full.
                    return Err(PodError::LocalStateStale {
                        partition: p,
                        stored: r.max_epoch,
                        found,
                    });
                }
                max_epoch = epoch;
                caught_up = last + 1 >= high;
                continue;
            }
            if m.key() == Some(claim::RESET_KEY) {
                // An owner rebuilt the partition from the input log here:
                // nothing before belongs to the state any more, not even
                // a record of another format (the likely cause of that
                // rebuild; without this every later owner rebuilt again).
                max_epoch = epoch;
                poisoned = None;
                batch.clear();
                self.store.clear_partition(p)?;
                resets += 1;
                caught_up = last + 1 >= high;
                continue;
            }
            if tail && epoch > max_epoch {
                // A newer owner's record whose claim is not in this tail:
                // it claimed before our checkpoint, so this pod wrote on
                // after it was replaced (a stale writer that never learnt
                // it, killed or stopped since), and its local rows and
                // checkpoint skip that owner's records. Start over in full.
                return Err(PodError::LocalStateStale {
                    partition: p,
                    stored: r.max_epoch,
                    found: epoch,
                });
            }
            max_epoch = epoch;
            if let Some(k) = m.key() {
                if let Some(Err(e)) = m.payload().map(crate::state::codec::check_version) {
                    // Refuse a record of another format before it is
                    // stored, and everything after it, until a reset.
                    // The checkpoint stays before it.
                    warn!(partition = p, offset = last, error = %e, "a changelog record of another format; looking for a rebuild's reset after it");
                    write_restored_upto(&self.store, &mut batch, p, last - 1, max_epoch)?;
                    poisoned = Some(e);
                    caught_up = last + 1 >= high;
                    continue;
                }
                batch.push((p, k.to_vec(), m.payload().map(<[u8]>::to_vec)));
                count += 1;
            }
            caught_up = last + 1 >= high;
            if batch.len() >= 10_000 {
                self.store
                    .write_restored(&batch, (p, last, max_epoch), now_ms(), false)?;
                batch.clear();
            }
        }
        if resets > 0 {
            info!(
                partition = p,
                at = last,
                "the changelog holds a rebuild's reset; the rows before it were discarded"
            );
        }
        let checkpoint = if caught_up { high - 1 } else { last };
        if poisoned.is_none()
            && checkpoint >= 0
            && (caught_up || !batch.is_empty() || stale > 0 || resets > 0)
        {
            // Synced once the restore is done (see `write_restored`).
            self.store
                .write_restored(&batch, (p, checkpoint, max_epoch), now_ms(), caught_up)?;
        }
        if stale > 0 {
            warn!(
                partition = p,
                records = stale,
                epoch = max_epoch,
                "ignored changelog records of an older ownership epoch (a stale writer's)"
            );
        }
        r.last = last;
        r.count += count;
        r.max_epoch = max_epoch;
        self.metrics.restore_records.inc_by(count);
        self.metrics.restore_stale_records.inc_by(stale);
        self.metrics
            .restore_remaining
            .with_label_values(&[&p.to_string()])
            .set((high - 1 - last).max(0));
        match poisoned {
            Some(e) if caught_up => Err(e.into()),
            Some(e) => {
                r.poisoned = Some(e);
                Ok(false)
            }
            None => Ok(caught_up),
        }
    }

    /// Publishes the set of held partitions to metrics and [`Stats`].
    pub(super) fn held_changed(&self) {
        self.shares.set(
            &self.metrics.assigned_partitions,
            ("assigned_partitions", ""),
            self.held.len() as i64,
        );
        if let Ok(mut h) = self.stats.held.lock() {
            *h = self.held.iter().copied().collect();
        }
    }

    /// Publishes the set of restoring partitions to metrics and readiness.
    pub(super) fn restoring_changed(&self) {
        self.shares.set(
            &self.metrics.restoring_partitions,
            ("restoring_partitions", ""),
            self.restoring.len() as i64,
        );
        if let Ok(mut r) = self.stats.restoring.lock() {
            *r = self.restoring.keys().copied().collect();
        }
    }
}

/// Stores the records read so far with the checkpoint `upto` (the offset
/// before a record of another format), and empties the batch.
fn write_restored_upto(
    store: &Store,
    batch: &mut Vec<Encoded>,
    p: Partition,
    upto: i64,
    max_epoch: u64,
) -> Result<(), PodError> {
    if upto >= 0 {
        store.write_restored(batch, (p, upto, max_epoch), now_ms(), true)?;
    }
    batch.clear();
    Ok(())
}

/// The offset of a record the shared probe read, if it is partition
/// `p`'s (not an earlier partition's).
fn offset_in(
    m: rdkafka::error::KafkaResult<BorrowedMessage<'_>>,
    p: Partition,
) -> Result<Option<i64>, PodError> {
    let m = m?;
    Ok((m.partition() == p).then(|| m.offset()))
}

/// The end of changelog partition `p` (one past its last offset), from the
/// last record batch the broker holds rather than from its reported high
/// watermark alone: a broker may report one past the *first* offset of the
/// last batch (tansu does), and a restore that stopped there would miss
/// the rest of the batch, while local state that reflects them would look
/// ahead of the changelog and be thrown away. Reading the batch that
/// starts at `reported - 1` is the positive evidence either way: on a
/// correct broker it is that one record, and the answer is `reported`.
fn true_end(
    reader: &BaseConsumer,
    topic: &str,
    p: Partition,
    low: i64,
    reported: i64,
) -> Result<i64, PodError> {
    if reported <= low {
        return Ok(reported);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(reported - 1))?;
    reader.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    // The batch comes in one fetch response: once its first record is
    // here, the rest are queued behind it.
    while last.is_none() && Instant::now() < deadline {
        if let Some(m) = reader.poll(Duration::from_millis(20)) {
            last = offset_in(m, p)?.or(last);
        }
    }
    if last.is_none() {
        // Nothing at the reported end (compacted away, or a broker that
        // does not answer): the reported end is all we know.
        warn!(
            partition = p,
            reported, "no record at the changelog's reported end; trusting it"
        );
        return Ok(reported);
    }
    while let Some(m) = reader.poll(Duration::from_millis(20)) {
        last = offset_in(m, p)?.or(last);
    }
    let end = last.map_or(reported, |o| o + 1).max(reported);
    if end != reported {
        debug!(
            partition = p,
            reported, end, "the changelog ends after its reported high watermark"
        );
    }
    reader.unassign()?;
    Ok(end)
}
