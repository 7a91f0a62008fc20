//! Records and ticks through the core, their effects into output records,
//! and the per-flush reports (metrics, progress rows, lag).

use super::*;

/// The partition's high watermark as librdkafka last saw it in a fetch
/// response: no request, so it is cheap enough to read every tick.
pub(super) fn cached_high_watermark(
    consumer: &BaseConsumer<PodContext>,
    topic: &str,
    p: Partition,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is live for the borrow of `consumer`, the
    // topic is a valid C string, and the two out-pointers are locals.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            p,
            &mut low,
            &mut high,
        )
    };

    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}

/// Registers the outputs `out[start..]`, made from a record of partition
/// `p`, with the cycle; outputs of a partition no longer owned are dropped
/// (they must not leave).
fn register(cycle: &mut Cycle, out: &mut Vec<OutRecord>, p: Partition, start: usize) {
    for i in start..out.len() {
        match cycle.output(p) {
            Some(tag) => debug_assert_eq!(tag.index as usize, i),
            None => {
                out.truncate(start);
                return;
            }
        }
    }
}

impl Processor {
    /// Converts effects to output records.
    pub(super) fn emit(&mut self, original: Option<(&[u8], Option<&[u8]>)>, src: Source<'_>) {
        let outputs = Outputs {
            cfg: &self.cfg,
            windows_partitions: self.windows_partitions,
        };
        let (mut valid, mut late, mut dup, mut expired) = (0, 0, 0, 0);
        let payload = original.map(|o| o.0).unwrap_or_default();
        // The fields of the record just read (none for effects no record
        // carries).
        let fields = if original.is_some() {
            self.engine.fields()
        } else {
            &[]
        };
        let mut effects = std::mem::take(&mut self.effects);
        for e in effects.drain(..) {
            let start = self.out.len();
            let from = match &e {
                Effect::Accepted { partition, .. }
                | Effect::Late { partition, .. }
                | Effect::Rejected { partition, .. }
                | Effect::Duplicate { partition, .. }
                | Effect::Retracted { partition, .. }
                | Effect::Expired { partition, .. } => *partition,
                Effect::Window(w) => w.partition,
            };
            match e {
                Effect::Accepted {
                    order,
                    alert,
                    offset,
                    partition,
                    ..
                } => {
                    valid += 1;
                    self.unreported
                        .add_revenue(order.order.currency, order.order.amount_micros);
                    outputs.accepted(
                        payload,
                        fields,
                        &order,
                        alert,
                        Source {
                            offset,
                            partition,
                            ..src
                        },
                        &mut self.out,
                    );
                }
                Effect::Late {
                    order,
                    alert,
                    offset,
                    partition,
                } => {
                    late += 1;
                    outputs.late(
                        payload,
                        fields,
                        &order,
                        alert,
                        Source {
                            offset,
                            partition,
                            ..src
                        },
                        &mut self.out,
                    );
                }
                Effect::Rejected {
                    rejection,
                    offset,
                    partition,
                } => {
                    if let Some(i) = Reason::ALL.iter().position(|r| *r == rejection.reason) {
                        self.unreported.invalid[i] += 1;
                    }
                    debug!(topic = src.topic, partition, offset, reason = %rejection.reason, "rejected");
                    let key = original.and_then(|o| o.1);
                    outputs.rejected(
                        payload,
                        key,
                        &rejection,
                        Source {
                            offset,
                            partition,
                            ..src
                        },
                        &mut self.out,
                    );
                }
                Effect::Duplicate { .. } => dup += 1,
                Effect::Window(w) => {
                    let epoch = self.epochs.get(&w.partition).copied().unwrap_or(0);
                    outputs.window(&w, epoch, &mut self.out)
                }
                Effect::Retracted {
                    partition,
                    spec_name,
                    key,
                } => outputs.tombstone(partition, &spec_name, &key, &mut self.out),
                Effect::Expired {
                    partition,
                    spec_name,
                    key,
                } => {
                    expired += 1;
                    outputs.tombstone(partition, &spec_name, &key, &mut self.out)
                }
            }
            register(&mut self.cycle, &mut self.out, from, start);
        }
        self.effects = effects;
        self.unreported.valid += valid;
        self.unreported.late += late;
        self.unreported.duplicate += dup;
        self.metrics.windows_expired.inc_by(expired);
    }

    /// Outputs of effects that no input record carries (ticks, flushes,
    /// restores: window updates and retractions).
    pub(super) fn emit_engine(&mut self) {
        let topic = self.input_topic.clone();
        self.emit(
            None,
            Source {
                topic: &topic,
                partition: -1,
                offset: -1,
            },
        );
    }

    /// `record_ms`: the record's Kafka timestamp, the reference an
    /// order's `created_at` is checked against (`timestamp_in_future`).
    pub(super) fn on_message(
        &mut self,
        p: Partition,
        offset: i64,
        record_ms: Option<i64>,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), PodError> {
        if !self.held.contains(&p) {
            // Restoring (fetched before the pause took effect: the seek
            // after the restore reads it again) or released after a
            // refused commit (its next owner reads it).
            return Ok(());
        }
        if !self.resumes.is_empty() && !self.check_resume(p, offset) {
            return Ok(());
        }
        // An Arc: lending the topic to `emit` must not cost an allocation per record.
        let topic = self.input_topic.clone();
        let _span = trace_span!("record", topic = %topic, partition = p, offset).entered();
        // Dedup entries beyond the engine's cache are read from RocksDB. A
        // read error stops the pod before anything the engine decided
        // after it is written: the record is processed again on restart.
        let mut reader = StoreReader::new(&self.store);
        self.engine.on_record_at(
            p,
            offset,
            payload,
            record_ms,
            now_ms(),
            &mut self.effects,
            &mut reader,
        );
        reader.result()?;
        self.emit(
            Some((payload, key)),
            Source {
                topic: &topic,
                partition: p,
                offset,
            },
        );
        self.cycle.input(p);
        if let Err(e) = self.send_new() {
            warn!(error = %e, "an output could not be offered; the flush sends it");
        }
        self.pending += 1;
        self.unreported.records += 1;
        Ok(())
    }

    /// Wall-clock progress. A store read error (a session a released
    /// watermark closes, not in memory) stops the pod, as in `on_message`.
    pub(super) fn tick(&mut self) -> Result<(), PodError> {
        let mut reader = StoreReader::new(&self.store);
        self.engine
            .tick_in(now_ms(), &mut self.effects, &mut reader);
        reader.result()?;
        self.emit_engine();
        let updates = match self.fx_follower.as_mut() {
            Some(f) => f.poll_updates(),
            None => Vec::new(),
        };
        if !updates.is_empty() {
            info!(updates = updates.len(), "applying FX rate updates");
        }
        let any = !updates.is_empty();
        for u in updates {
            if self.engine.apply_fx(u) {
                // In force from a time this pod has already processed
                // orders of: those stay converted at the version before
                // (and closed windows never change). Counted, since a
                // replay, which knows every version, may differ there.
                self.metrics.fx_late_rates.inc();
                warn!(update = ?u, "an FX rate arrived after orders it would have applied to; it applies from now on");
            }
        }
        if any {
            self.metrics
                .fx_versions
                .set(self.engine.fx().version_count() as i64);
        }
        Ok(())
    }

    /// Starts taking over a partition, inside the rebalance callback: only
    /// cheap work here. The partition is queued for restore and its fetches
    /// stay paused until [`Processor::restore_step`] has brought its state
    /// up to date. Returns the offset to assign it at: the local resume
    /// offset, or the beginning. Either is explicit, so librdkafka does not
    /// look up the committed offset, which could land after our seek.
    pub(super) fn begin_take(&mut self, p: Partition) -> Offset {
        self.engine.revoke(p);
        self.epochs.remove(&p);
        self.resumes.remove(&p);
        self.cycle.assign(p);
        self.restoring.insert(p, Restoring::new());
        self.restoring_changed();
        match self.store.next_offset(p) {
            Ok(Some(o)) => Offset::Offset(o),
            _ => Offset::Beginning,
        }
    }

    /// Progress rows (next offset, watermark) for the serving view's
    /// `as_of`, for partitions whose progress changed.
    pub(super) fn publish_progress(&mut self) {
        for p in self.held.iter().copied().collect::<Vec<_>>() {
            let Some(s) = self.engine.status(p) else {
                continue;
            };
            let now = (s.next_offset, s.watermark, s.idle);
            if self.published.get(&p) == Some(&now) {
                continue;
            }
            self.published.insert(p, now);
            let rec = ProgressRecord {
                partition: p,
                next_offset: s.next_offset,
                watermark: s.watermark,
                idle: s.idle,
                epoch: self.epochs.get(&p).copied().unwrap_or(0),
            };
            let start = self.out.len();
            self.out.push(OutRecord {
                // With the partition's partials: never ahead of them.
                partition: Some(crate::wire::windows_partition(p, self.windows_partitions)),
                topic: self.cfg.topics.windows_topic.clone(),
                key: Some(crate::wire::windows::progress_key(p).into_bytes()),
                payload: serde_json::to_vec(&rec).ok(),
                headers: Vec::new(),
            });
            register(&mut self.cycle, &mut self.out, p, start);
        }
    }

    /// Per-flush metric updates.
    pub(super) fn report(&mut self, c: Counts, started: Instant) {
        let m = &self.metrics;
        let invalid: u64 = c.invalid.iter().sum();
        m.flush_duration.observe(started.elapsed().as_secs_f64());
        m.flush_records.observe(c.records as f64);
        m.records_consumed.inc_by(c.records);
        m.events.with_label_values(&["valid"]).inc_by(c.valid);
        m.events.with_label_values(&["late"]).inc_by(c.late);
        m.events
            .with_label_values(&["duplicate"])
            .inc_by(c.duplicate);
        m.events.with_label_values(&["invalid"]).inc_by(invalid);
        for (i, n) in c.invalid.iter().enumerate() {
            if *n > 0 {
                m.invalid_events
                    .with_label_values(&[Reason::ALL[i].as_str()])
                    .inc_by(*n);
            }
        }
        for (currency, micros) in &c.revenue {
            m.revenue
                .with_label_values(&[currency.as_str()])
                .inc_by(*micros as f64 / MICROS as f64);
        }
        let cache = self.engine.cache_stats();
        let before = std::mem::replace(&mut self.reported_cache, cache);
        use crate::telemetry::memory::{DEDUP_ENTRY_BYTES, SESSION_SET_BYTES};
        for (kind, now, was, row_bytes) in [
            ("dedup", cache.dedup, before.dedup, DEDUP_ENTRY_BYTES),
            (
                "sessions",
                cache.sessions,
                before.sessions,
                SESSION_SET_BYTES,
            ),
        ] {
            self.shares.set(
                &m.state_cache_entries.with_label_values(&[kind]),
                ("state_cache_entries", kind),
                now.entries as i64,
            );
            self.shares.set(
                &m.state_cache_bytes.with_label_values(&[kind]),
                ("state_cache_bytes", kind),
                (now.entries * row_bytes) as i64,
            );
            m.state_cache_lookups
                .with_label_values(&[kind, "hit"])
                .inc_by(now.hits - was.hits);
            m.state_cache_lookups
                .with_label_values(&[kind, "miss"])
                .inc_by(now.misses - was.misses);
            m.state_cache_evictions
                .with_label_values(&[kind])
                .inc_by(now.evicted - was.evicted);
        }
        let (block_cache, memtables) = self.store.memory();
        for (kind, bytes) in [("block_cache", block_cache), ("memtables", memtables)] {
            self.shares.set(
                &m.rocksdb_memory.with_label_values(&[kind]),
                ("rocksdb_memory", kind),
                bytes as i64,
            );
        }
        for (kind, n) in self.engine.open_windows() {
            self.shares.set(
                &m.open_windows.with_label_values(&[kind]),
                ("open_windows", kind),
                n as i64,
            );
        }
        let now = now_ms();
        for (p, s) in self.engine.partitions() {
            if let Some(wm) = s
                .watermark
                .filter(|w| *w > i64::MIN / 2 && *w < i64::MAX / 2)
            {
                let label = p.to_string();
                m.watermark
                    .with_label_values(&[&label])
                    .set(wm as f64 / 1000.0);
                m.watermark_delay
                    .with_label_values(&[&label])
                    .set((now - wm) as f64 / 1000.0);
            }
        }
    }

    /// Lag per held partition from the cached high watermarks (no request).
    /// Lag per partition, to the metrics and readiness; and to the engine
    /// as its backlog: a partition with records to read, or paused by this
    /// pod, is never idle (only the broker can make it so).
    pub(super) fn update_lag(&mut self, consumer: &BaseConsumer<PodContext>) {
        let mut sum = 0i64;
        for p in self.held.clone() {
            let Some(s) = self.engine.status(p) else {
                continue;
            };
            let paused = self.fetch_paused || self.seeks.contains_key(&p);
            let Some(high) = cached_high_watermark(consumer, &self.cfg.topics.input_topic, p)
            else {
                // Not fetched yet: unknown is not "nothing to read".
                self.engine.set_readable(p, Readable::Paused);
                continue;
            };
            let lag = (high - s.next_offset).max(0);
            self.engine.set_readable(
                p,
                if lag > 0 {
                    Readable::Behind
                } else if paused {
                    Readable::Paused
                } else {
                    Readable::CaughtUp
                },
            );
            sum += lag;
            self.metrics
                .log_end_offset
                .with_label_values(&[&self.cfg.topics.input_topic, &p.to_string()])
                .set(high);
            self.metrics
                .consumergroup_lag
                .with_label_values(&[
                    &self.cfg.kafka.group,
                    &self.cfg.topics.input_topic,
                    &p.to_string(),
                ])
                .set(lag);
        }
        self.shares.set(
            &self
                .metrics
                .consumergroup_lag_sum
                .with_label_values(&[&self.cfg.kafka.group, &self.cfg.topics.input_topic]),
            ("consumergroup_lag_sum", ""),
            sum,
        );
        self.stats.lag.store(sum as u64, Ordering::Relaxed);
    }

    /// Whether the batch being collected is due to be sealed: full, or
    /// its interval is over.
    pub(super) fn due(&self) -> bool {
        self.pending >= self.cfg.flush.flush_max_events
            || self.last_flush.elapsed() >= Duration::from_millis(self.cfg.flush.flush_interval_ms)
    }
}
