//! Answers: definitions, the watermark every partition vouches for,
//! merged windows and the revenue split.

use super::*;

impl View {
    /// The window definitions the pods are configured with: a query that
    /// names none is answered from these alone (rows of definitions
    /// dropped from the configuration stay in the compacted topic and are
    /// served only when named).
    pub fn set_definitions(&mut self, defs: Vec<crate::window::WindowSpec>) {
        self.definitions = Some(defs);
    }

    /// Whether a row of definition `spec` answers query `q`.
    pub(super) fn serves(&self, q: &WindowQuery, spec: &str) -> bool {
        match (&q.spec, &self.definitions) {
            (Some(named), _) => named == spec,
            (None, Some(defs)) => defs.iter().any(|d| d.name == spec),
            (None, None) => true,
        }
    }

    /// The tumbling definition `/revenue` sums for group-by `by`: the one
    /// named, or else the shortest configured one (documented default);
    /// `None` when no tumbling definition groups by `by`. Two configured
    /// of the same shortest size are ambiguous. A name may be a definition
    /// no longer configured whose rows the topic still holds.
    pub fn revenue_definition(
        &self,
        by: &str,
        named: Option<&str>,
    ) -> Result<Option<String>, DefinitionError> {
        let defs = self.definitions.as_deref().unwrap_or(&[]);
        if let Some(name) = named {
            if let Some(d) = defs.iter().find(|d| d.name == name) {
                return match d.kind {
                    crate::window::WindowKind::Tumbling { .. } => {
                        Ok((d.by.name() == by).then(|| name.to_string()))
                    }
                    _ => Err(DefinitionError::NotTumbling(name.into())),
                };
            }
            // Not configured (any more): served if the topic still holds
            // its rows (a scan, for a name nobody configures).
            let bys_of = |kind: &str| -> Vec<&str> {
                self.fixed
                    .iter()
                    .filter(|((k, _), m)| k == kind && m.keys().any(|(_, spec, _)| spec == name))
                    .map(|((_, b), _)| b.as_str())
                    .collect()
            };
            let bys = bys_of("tumbling");
            if !bys.is_empty() {
                return Ok(bys.contains(&by).then(|| name.to_string()));
            }
            if !bys_of("sliding").is_empty() {
                return Err(DefinitionError::NotTumbling(name.into()));
            }
            return Err(DefinitionError::Unknown(name.into()));
        }
        let mut tumbling: Vec<(i64, &str)> = defs
            .iter()
            .filter(|d| d.by.name() == by)
            .filter_map(|d| match d.kind {
                crate::window::WindowKind::Tumbling { size_ms } => Some((size_ms, d.name.as_str())),
                _ => None,
            })
            .collect();
        tumbling.sort();
        match tumbling.as_slice() {
            [] => Ok(None),
            [(a, _), (b, _), ..] if a == b => Err(DefinitionError::Ambiguous {
                by: by.into(),
                names: tumbling
                    .iter()
                    .filter(|(s, _)| s == a)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            [(_, n), ..] => Ok(Some(n.to_string())),
        }
    }

    /// The input topic's partition count, from its metadata: every one of
    /// them must vouch (a progress row) before a window is final, not only
    /// those that happened to publish.
    pub fn set_input_partitions(&mut self, n: usize) {
        self.input_partitions = Some(n);
    }

    /// The minimum watermark over every input partition: `None` until each
    /// of them has published one (or while the partition count is
    /// unknown), so a partition that has not vouched yet holds back every
    /// decision that spans partitions.
    pub fn global_watermark(&self) -> Option<i64> {
        let n = self.input_partitions?;
        let mut min: Option<i64> = None;
        for p in 0..n {
            let wm = self.progress.get(&(p as Partition))?.watermark?;
            min = Some(min.map_or(wm, |m: i64| m.min(wm)));
        }
        min
    }

    pub fn as_of(&self) -> AsOf {
        AsOf {
            watermark: self.global_watermark(),
            partitions: self.progress.values().cloned().collect(),
        }
    }

    /// Final: every partial final and, for fixed windows, every input
    /// partition's watermark past the close.
    pub(super) fn is_final(&self, e: &Entry, global_wm: Option<i64>) -> bool {
        e.all_final
            && (&*e.head.kind == "session"
                || global_wm.is_some_and(|w| w >= e.head.end.saturating_add(self.grace_ms)))
    }

    /// `wm`: the global watermark, computed once per query.
    pub(super) fn merged(&self, e: &Entry, wm: Option<i64>) -> WindowView {
        let mut agg = PartialAgg::default();
        for (_, p) in &e.partials {
            agg.merge(&p.agg);
        }
        let h = &e.head;
        WindowView {
            window_id: h.window_id(),
            spec: h.spec.to_string(),
            kind: h.kind.to_string(),
            by: h.by.to_string(),
            key: h.key.to_string(),
            start: h.start,
            end: h.end,
            is_final: self.is_final(e, wm),
            partitions: e.partials.iter().map(|(p, _)| *p).collect(),
            count: agg.count,
            revenue_usd: usd(agg.revenue_usd_micros),
            revenue_usd_micros: agg.revenue_usd_micros,
            revenue_by_currency: agg
                .revenue_by_currency
                .iter()
                .map(|(c, m)| (c.to_string(), *m as f64 / MICROS as f64))
                .collect(),
            unique_customers: agg.unique_customers as usize,
            avg_usd: agg.avg_usd(),
            min_usd: agg.min_usd(),
            max_usd: agg.max_usd(),
            p95_usd: agg.p95_usd(),
        }
    }

    /// The (kind, by) pairs that have windows.
    pub fn kinds(&self) -> BTreeSet<(String, String)> {
        let mut s: BTreeSet<(String, String)> = self.fixed.keys().cloned().collect();
        if !self.sessions.is_empty() || self.shelved > 0 {
            s.insert(("session".into(), "customer".into()));
        }
        s
    }

    /// Merged windows matching `q`, sorted by start then key.
    pub fn windows(&self, q: &WindowQuery) -> Vec<WindowView> {
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let wm = self.global_watermark();
        let keep = |w: &WindowView| {
            q.key.as_ref().is_none_or(|k| &w.key == k)
                && q.is_final.is_none_or(|f| w.is_final == f)
                && self.serves(q, &w.spec)
        };
        let mut out = Vec::new();
        if q.kind == "session" {
            let mut visit = |e: &Entry| {
                if q.from.is_some_and(|f| e.head.start < f)
                    || q.to.is_some_and(|t| e.head.start >= t)
                {
                    return true;
                }
                let w = self.merged(e, wm);
                if keep(&w) {
                    out.push(w);
                    // Keep the first `limit` by (start, key) as we go, so
                    // a scan of millions of sessions holds at most twice
                    // the limit.
                    if limit != usize::MAX && out.len() >= 2 * limit.max(1) {
                        out.sort_by(|a, b| (a.start, &a.key).cmp(&(b.start, &b.key)));
                        out.truncate(limit);
                    }
                }
                true
            };
            match &q.key {
                Some(k) => {
                    for e in &self.sessions_of(k) {
                        visit(e);
                    }
                }
                None => self.each_session(&mut visit),
            }
            out.sort_by(|a, b| (a.start, &a.key).cmp(&(b.start, &b.key)));
            out.truncate(limit);
            return out;
        }
        let Some(m) = self.fixed.get(&(q.kind.clone(), q.by.clone())) else {
            return out;
        };
        let lo = (q.from.unwrap_or(i64::MIN), String::new(), String::new());
        for (k, e) in m.range(lo..) {
            if q.to.is_some_and(|t| k.0 >= t) || out.len() >= limit {
                break;
            }
            let w = self.merged(e, wm);
            if keep(&w) {
                out.push(w);
            }
        }
        out
    }

    /// All sessions of one customer, oldest first.
    pub fn customer_sessions(&self, customer: &str) -> Vec<WindowView> {
        let wm = self.global_watermark();
        self.sessions_of(customer)
            .iter()
            .map(|e| self.merged(e, wm))
            .collect()
    }

    /// Final + live = combined revenue per key of the tumbling windows of
    /// definition `spec` grouped `by`, for windows starting in [from, to).
    /// One definition: summing two (a minute and an hour by currency)
    /// counted every order twice.
    pub fn revenue_split(
        &self,
        by: &str,
        spec: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> BTreeMap<String, Split> {
        let mut sums: BTreeMap<&str, (i128, i128, u64, u64)> = BTreeMap::new();
        let wm = self.global_watermark();
        if let Some(m) = self.fixed.get(&("tumbling".to_string(), by.to_string())) {
            let lo = (from.unwrap_or(i64::MIN), String::new(), String::new());
            for (k, e) in m.range(lo..) {
                if to.is_some_and(|t| k.0 >= t) {
                    break;
                }
                if k.1 != spec {
                    continue;
                }
                let s = sums.entry(&*e.head.key).or_default();
                if self.is_final(e, wm) {
                    s.0 += e.revenue_micros;
                    s.2 += e.count;
                } else {
                    s.1 += e.revenue_micros;
                    s.3 += e.count;
                }
            }
        }
        sums.into_iter()
            .map(|(k, (f, l, fc, lc))| (k.to_string(), Split::of(f, l, fc, lc)))
            .collect()
    }
}
