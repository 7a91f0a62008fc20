//! The view's sessions on a shelf: the shell's store behind a write-back
//! cache of recently changed customers.

use super::*;

/// A shelved session as an entry of `customer`'s.
pub(super) fn unshelved(
    customer: &Arc<str>,
    kind: &Arc<str>,
    by: &Arc<str>,
    s: ShelvedSession,
) -> Entry {
    let mut e = Entry::new(Head {
        spec: Arc::from(s.spec),
        kind: kind.clone(),
        by: by.clone(),
        key: customer.clone(),
        start: s.start,
        end: s.end,
    });
    e.partials = s
        .partials
        .into_iter()
        .map(|(p, is_final, epoch, agg)| {
            let partial = Partial {
                is_final,
                epoch,
                agg,
            };
            (p, partial)
        })
        .collect();
    e.refresh();
    e
}

/// An entry as the shelf keeps it.
pub(super) fn shelve(e: &Entry) -> ShelvedSession {
    ShelvedSession {
        spec: e.head.spec.to_string(),
        start: e.head.start,
        end: e.head.end,
        partials: e
            .partials
            .iter()
            .map(|(p, x)| (*p, x.is_final, x.epoch, x.agg.clone()))
            .collect(),
    }
}

/// Where a customer's session `(spec, start)` is, or would go, in its list.
pub(super) fn find_session(list: &[Entry], spec: &str, start: i64) -> Result<usize, usize> {
    list.binary_search_by(|e| (&*e.head.spec, e.head.start).cmp(&(spec, start)))
}

impl View {
    /// Keeps the sessions on `shelf` instead of in memory, with at most
    /// `hot_customers` customers' sessions in memory between write-backs
    /// (0: every change is written through). Set before the first update;
    /// the shelf starts empty.
    pub fn set_session_shelf(&mut self, shelf: Box<dyn SessionShelf>, hot_customers: usize) {
        self.shelf = Some(shelf);
        self.hot_cap = hot_customers;
    }

    /// Writes `n` of the customers held in memory (any `n`) to the shelf,
    /// as one batch, and forgets them.
    pub(super) fn write_back(&mut self, n: usize) {
        let Some(shelf) = self.shelf.as_mut() else {
            return;
        };
        let out: Vec<Arc<str>> = self.hot.keys().take(n).cloned().collect();
        if out.is_empty() {
            return;
        }
        let batch: Vec<(Arc<str>, Vec<ShelvedSession>)> = out
            .into_iter()
            .filter_map(|customer| self.hot.remove_entry(&customer))
            .map(|(customer, list)| (customer, list.iter().map(shelve).collect()))
            .collect();
        shelf.put_many(&batch);
    }

    /// Whether sessions are kept on a shelf.
    pub fn shelved(&self) -> bool {
        self.shelf.is_some()
    }

    /// Applies `change` to a customer's sessions wherever they are kept.
    pub(super) fn with_sessions<R>(
        &mut self,
        customer: &str,
        change: impl FnOnce(&mut Vec<Entry>) -> R,
    ) -> R {
        if self.shelf.is_none() {
            let key = match self.sessions.get_key_value(customer) {
                Some((k, _)) => k.clone(),
                None => Arc::from(customer),
            };
            let list = self.sessions.entry(key.clone()).or_default();
            let r = change(list);
            if list.is_empty() {
                self.sessions.remove(&key);
            }
            return r;
        }
        let (customer, mut list, was_hot) = match self.hot.remove_entry(customer) {
            Some((k, list)) => (k, list, true),
            None => (Arc::from(customer), self.shelved_sessions(customer), false),
        };
        let before = list.len();
        let r = change(&mut list);
        self.shelved = (self.shelved + list.len()).saturating_sub(before);
        // A customer with nothing before or after (a tombstone of a session
        // not held) has nothing to write back.
        if was_hot || before > 0 || !list.is_empty() {
            self.hot.insert(customer, list);
            if self.hot.len() > self.hot_cap {
                self.write_back((self.hot_cap / 16).max(1));
            }
        }
        r
    }

    /// Every session, wherever kept, until `f` returns false.
    pub(super) fn each_session(&self, f: &mut dyn FnMut(&Entry) -> bool) {
        match &self.shelf {
            None => {
                for list in self.sessions.values() {
                    for e in list {
                        if !f(e) {
                            return;
                        }
                    }
                }
            }
            Some(shelf) => {
                for list in self.hot.values() {
                    for e in list {
                        if !f(e) {
                            return;
                        }
                    }
                }
                let (kind, by) = (Arc::<str>::from("session"), Arc::<str>::from("customer"));
                shelf.scan(&mut |customer, list| {
                    if self.hot.contains_key(customer) {
                        // Stale here: served from `hot` above.
                        return true;
                    }
                    let key: Arc<str> = Arc::from(customer);
                    for s in list {
                        let e = unshelved(&key, &kind, &by, s);
                        if !f(&e) {
                            return false;
                        }
                    }
                    true
                });
            }
        }
    }

    /// One customer's sessions, wherever kept.
    pub(super) fn sessions_of(&self, customer: &str) -> Vec<Entry> {
        match self.hot.get(customer) {
            Some(list) => list.clone(),
            None if self.shelf.is_some() => self.shelved_sessions(customer),
            None => self.sessions.get(customer).cloned().unwrap_or_default(),
        }
    }

    /// One customer's sessions as the shelf has them (stale if the
    /// customer is in `hot`).
    pub(super) fn shelved_sessions(&self, customer: &str) -> Vec<Entry> {
        let Some(shelf) = &self.shelf else {
            return Vec::new();
        };
        let (kind, by) = (Arc::<str>::from("session"), Arc::<str>::from("customer"));
        let key: Arc<str> = Arc::from(customer);
        shelf
            .get(customer)
            .into_iter()
            .map(|s| unshelved(&key, &kind, &by, s))
            .collect()
    }
}
