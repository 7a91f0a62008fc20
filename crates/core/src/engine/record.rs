//! Applying one input record: dedup, lateness, and the fold into every
//! window and session it belongs to.

use super::*;

impl Engine {
    /// Applies one input record. Records below the partition's next offset
    /// were already applied and are ignored.
    pub fn on_record(
        &mut self,
        p: Partition,
        offset: Offset,
        payload: &[u8],
        wall_ms: i64,
        out: &mut Vec<Effect>,
    ) {
        debug_assert!(self.dedup_limit.is_none(), "a cache limit needs a reader");
        self.on_record_in(p, offset, payload, wall_ms, out, &mut InMemory);
    }

    /// [`Engine::on_record`], reading dedup entries not in memory through
    /// `reader`.
    pub fn on_record_in(
        &mut self,
        p: Partition,
        offset: Offset,
        payload: &[u8],
        wall_ms: i64,
        out: &mut Vec<Effect>,
        reader: &mut dyn StateReader,
    ) {
        self.on_record_at(p, offset, payload, None, wall_ms, out, reader);
    }

    /// [`Engine::on_record_in`] for a record whose Kafka timestamp is
    /// `record_ms`: an order whose `created_at` is more than
    /// [`CoreConfig::max_future_skew_ms`] ahead of it is rejected
    /// (`timestamp_in_future`) before it can move the watermark. The
    /// timestamp is part of the log, so a replay decides the same; a
    /// record without one is not checked.
    #[allow(clippy::too_many_arguments)]
    pub fn on_record_at(
        &mut self,
        p: Partition,
        offset: Offset,
        payload: &[u8],
        record_ms: Option<i64>,
        wall_ms: i64,
        out: &mut Vec<Effect>,
        reader: &mut dyn StateReader,
    ) {
        self.fields.clear();
        let next_flush = self.flush_seq + 1;
        let session_limited = self.session_limit.is_some();
        let part = self
            .parts
            .entry(p)
            .or_insert_with(|| Part::new(wall_ms, self.cfg.hash_seed, self.cfg.windows.len()));
        if offset < part.next_offset {
            return;
        }
        part.next_offset = offset + 1;
        part.last_active_wall = wall_ms;
        part.idle = false;
        part.meta_dirty = true;

        let skew = self.cfg.max_future_skew_ms;
        let parsed = parse_order_fields(payload, &self.cfg.limits, &mut self.fields)
            .and_then(|o| match record_ms {
                Some(ts) if o.created_at_ms > ts.saturating_add(skew) => Err(Rejection::new(
                    Reason::TimestampInFuture,
                    Some("created_at"),
                    format!(
                        "created_at {} ms is {} ms ahead of the record's timestamp {ts} ms (allowed: {skew} ms)",
                        o.created_at_ms,
                        o.created_at_ms - ts
                    ),
                )),
                _ => Ok(o),
            });
        let order = match parsed.and_then(|o| enrich(o, &self.fx, wall_ms)) {
            Ok(o) => o,
            Err(rejection) => {
                self.fields.clear();
                out.push(Effect::Rejected {
                    partition: p,
                    offset,
                    rejection,
                });
                return;
            }
        };
        // An expired entry waiting for its purge counts as absent, so the
        // outcome never depends on when flushes happened.
        let horizon = self.cfg.dedup_horizon_ms;
        if self.dedup_limit.is_some() {
            if part.dedup.contains_key(&order.order.order_id) {
                self.cache.dedup.hits += 1;
            } else {
                self.cache.dedup.misses += 1;
                if let Some(row) = reader.dedup(p, &order.order.order_id) {
                    part.dedup.insert(order.order.order_id.clone(), row);
                }
            }
        }
        let live = part
            .dedup
            .get(&order.order.order_id)
            .filter(|d| !part.is_closed_at(d.event_ms + horizon));
        let first_seen = match live {
            Some(d) if d.offset < offset => {
                out.push(Effect::Duplicate {
                    partition: p,
                    offset,
                    order_id: order.order.order_id,
                });
                return;
            }
            // The same record again (a replay after a partial flush).
            Some(_) => false,
            None => true,
        };

        let t = order.order.created_at_ms;
        let customer = customer_hash(&order.order.customer_id);
        let grace = self.cfg.grace_ms;
        let mut open = 0u16;
        let mut late = 0u16;
        for (i, spec) in self.cfg.windows.iter().enumerate() {
            let spec_ix = i as u16;
            let folded = match spec.kind {
                WindowKind::Session { gap_ms } => {
                    let fold = SessionFold {
                        p,
                        spec_ix,
                        spec_name: &spec.name,
                        gap: gap_ms,
                        grace,
                        offset,
                        next_flush,
                    };
                    let cache = session_limited.then_some(&mut self.cache.sessions);
                    fold.apply(part, &order, customer, out, cache, reader)
                }
                _ => {
                    // One key, reused: looking up a window that exists
                    // (the common case) allocates nothing.
                    let key = &mut self.scratch;
                    key.spec = spec_ix;
                    key.group.clear();
                    key.group.push_str(spec.by.key_of(&order));
                    let mut any = false;
                    for (start, end) in assign(&spec.kind, t) {
                        let close_at = end + grace;
                        if part.is_closed_at(close_at) {
                            continue;
                        }
                        any = true;
                        key.start = start;
                        fold_fixed(part, key, end, close_at, &order, customer, offset);
                    }
                    any
                }
            };
            if folded {
                open += 1;
            } else {
                late += 1;
            }
        }

        if first_seen {
            let expire = t + horizon;
            if !part.is_closed_at(expire) {
                part.dedup.insert(
                    order.order.order_id.clone(),
                    DedupRow {
                        event_ms: t,
                        offset,
                    },
                );
                if self.dedup_limit.is_none() {
                    part.dedup_expiry
                        .insert((expire, order.order.order_id.clone()));
                }
                part.dedup_touched.insert(order.order.order_id.clone());
            }
        }

        let alert = order.amount_usd_micros >= self.cfg.alert_threshold_usd_micros;
        if open > 0 {
            out.push(Effect::Accepted {
                partition: p,
                offset,
                order,
                alert,
                late_windows: late,
            });
        } else {
            out.push(Effect::Late {
                partition: p,
                offset,
                order,
                alert,
            });
        }

        if part.max_event_ms.is_none_or(|m| t > m) {
            part.max_event_ms = Some(t);
            let candidate = t - self.cfg.out_of_orderness_ms;
            if part.watermark.is_none_or(|w| candidate > w) {
                part.watermark = Some(candidate);
                self.advance(p, out, reader);
            }
        }
    }
}

pub(super) fn fold_fixed(
    part: &mut Part,
    key: &WindowKey,
    end: i64,
    close_at: i64,
    order: &EnrichedOrder,
    customer: u64,
    offset: Offset,
) {
    match part.windows.get_mut(key) {
        Some(row) => {
            // A closed row never changes; a row that already holds this
            // offset (restored from a flush cut in half) must not count it twice.
            if row.closed || row.offset >= offset {
                return;
            }
            if add_order(&mut row.agg, order, customer) {
                match part.new_members.get_mut(key) {
                    Some(v) => v.push(customer),
                    None => {
                        part.new_members.insert(key.clone(), vec![customer]);
                    }
                }
            }
            row.offset = offset;
            touch(&mut part.touched, key);
        }
        None => {
            let mut agg = Aggregate::default();
            add_order(&mut agg, order, customer);
            part.new_members.insert(key.clone(), vec![customer]);
            part.windows.insert(
                key.clone(),
                WindowRow {
                    end,
                    agg,
                    offset,
                    closed: false,
                },
            );
            part.closing.insert((close_at, key.clone()));
            part.touched.insert(key.clone(), false);
        }
    }
}

/// Marks `key` changed and not announced (a clone only when new).
pub(super) fn touch<K: std::hash::Hash + Eq + Clone>(touched: &mut FastMap<K, bool>, key: &K) {
    match touched.get_mut(key) {
        Some(announced) => *announced = false,
        None => {
            touched.insert(key.clone(), false);
        }
    }
}

/// The keys of `touched` not announced since their last change, marked
/// announced.
pub(super) fn unannounced<K: Clone>(touched: &mut FastMap<K, bool>) -> Vec<K> {
    touched
        .iter_mut()
        .filter(|(_, announced)| !**announced)
        .map(|(k, announced)| {
            *announced = true;
            k.clone()
        })
        .collect()
}

/// Returns whether the customer is new in `agg`.
pub(super) fn add_order(agg: &mut Aggregate, o: &EnrichedOrder, customer: u64) -> bool {
    agg.add(
        o.amount_usd_micros,
        o.order.currency,
        o.order.amount_micros,
        customer,
    )
}

/// Folding one order into its customer's sessions for one definition.
pub(super) struct SessionFold<'a> {
    p: Partition,
    spec_ix: u16,
    spec_name: &'a str,
    gap: i64,
    grace: i64,
    offset: Offset,
    next_flush: FlushId,
}

impl SessionFold<'_> {
    /// Returns false when the order is late for this definition: its own
    /// session `[t, t]` would already be closed.
    ///
    /// Closed sessions are final and take no part in merging (as in Flink):
    /// an order that arrives after its neighbour closed, but whose own
    /// session is still open, starts or joins another session. So whether a
    /// closed session is still held or already purged changes nothing.
    /// `cache`: with a session cache limit, its counters; a set not in
    /// memory is then read through `reader`.
    pub(super) fn apply(
        &self,
        part: &mut Part,
        order: &EnrichedOrder,
        customer: u64,
        out: &mut Vec<Effect>,
        cache: Option<&mut RowCacheStats>,
        reader: &mut dyn StateReader,
    ) -> bool {
        let (gap, grace) = (self.gap, self.grace);
        let t = order.order.created_at_ms;
        if part.is_closed_at(t + gap + grace) {
            return false;
        }
        let cust = &order.order.customer_id;
        // Look up before inserting: a customer seen before costs one key
        // (the lookup's), not the two an `entry` and its clone would.
        let skey = (self.spec_ix, cust.clone());
        if let Some(cache) = cache {
            if part.sessions.contains_key(&skey) {
                cache.hits += 1;
            } else {
                cache.misses += 1;
                part.read_sessions(self.p, skey.clone(), gap + grace, reader);
            }
        }
        let set = match part.sessions.get_mut(&skey) {
            Some(set) => set,
            None => part.sessions.entry(skey.clone()).or_default(),
        };
        if set.offset >= self.offset && !set.is_empty() {
            // This customer's sessions already hold this record (a replay
            // after a flush that was cut in half).
            return true;
        }
        // Open sessions closer than `gap` to the event merge with it.
        let mut touching: Vec<Session> = Vec::new();
        let mut i = 0;
        while i < set.sessions.len() {
            let s = &set.sessions[i];
            if !s.closed && s.start - gap < t && t < s.last + gap {
                touching.push(set.sessions.remove(i));
            } else {
                i += 1;
            }
        }
        let mut merged = Session {
            start: t,
            last: t,
            agg: Aggregate::default(),
            offset: self.offset,
            closed: false,
        };
        part.open_sessions = (part.open_sessions + 1).saturating_sub(touching.len());
        for s in &touching {
            merged.start = merged.start.min(s.start);
            merged.last = merged.last.max(s.last);
            merged.agg.merge(&s.agg);
            part.closing
                .remove(&(s.last + gap + grace, self.key(cust, s.start)));
        }
        add_order(&mut merged.agg, order, customer);
        for s in &touching {
            if s.start != merged.start {
                let key = self.key(cust, s.start);
                out.push(Effect::Retracted {
                    partition: self.p,
                    spec_name: self.spec_name.to_string(),
                    key: key.clone(),
                });
                set.retracted.push(s.start);
                part.pending_purge
                    .push(Purge::Retraction(self.next_flush, key));
            }
        }
        part.closing
            .insert((merged.last + gap + grace, self.key(cust, merged.start)));
        let at = set.sessions.partition_point(|s| s.start < merged.start);
        crate::aggregate::first_of_many(&mut set.sessions);
        set.sessions.insert(at, merged);
        set.offset = self.offset;
        touch(&mut part.sessions_touched, &skey);
        true
    }

    pub(super) fn key(&self, customer: &str, start: i64) -> WindowKey {
        WindowKey {
            spec: self.spec_ix,
            group: customer.to_string(),
            start,
        }
    }
}
