//! Window definitions and assigners.
//!
//! All windows are half-open, `[start, end)`, in event-time milliseconds, and
//! aligned to the epoch. Sessions are not assigned here: they depend on the
//! other events of the customer, so the engine merges them (see `engine`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::order::EnrichedOrder;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WindowKind {
    /// `[t − t mod size, … + size)`.
    Tumbling { size_ms: i64 },
    /// Hopping windows on a grid of `slide_ms`; an event is in `size/slide` of them.
    Sliding { size_ms: i64, slide_ms: i64 },
    /// Per-key activity sessions: events closer than `gap_ms` share a session.
    Session { gap_ms: i64 },
}

impl WindowKind {
    pub fn name(&self) -> &'static str {
        match self {
            WindowKind::Tumbling { .. } => "tumbling",
            WindowKind::Sliding { .. } => "sliding",
            WindowKind::Session { .. } => "session",
        }
    }

    /// How far past an event's time its windows may still be open, before
    /// grace: `size` for tumbling and sliding, `gap` for sessions (measured
    /// from the event itself). The dedup horizon must cover this plus grace.
    pub fn extent_ms(&self) -> i64 {
        match *self {
            WindowKind::Tumbling { size_ms } => size_ms,
            WindowKind::Sliding { size_ms, .. } => size_ms,
            WindowKind::Session { gap_ms } => gap_ms,
        }
    }
}

/// The field a window groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Currency,
    Region,
    Customer,
}

impl GroupBy {
    pub fn name(&self) -> &'static str {
        match self {
            GroupBy::Currency => "currency",
            GroupBy::Region => "region",
            GroupBy::Customer => "customer",
        }
    }

    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "currency" => Some(GroupBy::Currency),
            "region" => Some(GroupBy::Region),
            "customer" => Some(GroupBy::Customer),
            _ => None,
        }
    }

    /// The group key of an order.
    pub fn key_of<'a>(&self, o: &'a EnrichedOrder) -> &'a str {
        match self {
            GroupBy::Currency => o.order.currency.as_str(),
            GroupBy::Region => &o.order.region,
            GroupBy::Customer => &o.order.customer_id,
        }
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One window definition: a name (stable: it is part of every window id), a
/// kind and a grouping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowSpec {
    pub name: String,
    pub kind: WindowKind,
    pub by: GroupBy,
}

impl WindowSpec {
    pub fn tumbling(name: &str, size_ms: i64, by: GroupBy) -> Self {
        WindowSpec {
            name: name.into(),
            kind: WindowKind::Tumbling { size_ms },
            by,
        }
    }

    pub fn sliding(name: &str, size_ms: i64, slide_ms: i64, by: GroupBy) -> Self {
        WindowSpec {
            name: name.into(),
            kind: WindowKind::Sliding { size_ms, slide_ms },
            by,
        }
    }

    pub fn session(name: &str, gap_ms: i64) -> Self {
        WindowSpec {
            name: name.into(),
            kind: WindowKind::Session { gap_ms },
            by: GroupBy::Customer,
        }
    }

    /// The defaults (docs/semantics.md, "Windows"): tumbling 1 min by currency and by region,
    /// sliding 5 min every 1 min by region, 30-minute sessions per customer.
    pub fn defaults() -> Vec<WindowSpec> {
        vec![
            WindowSpec::tumbling("tumbling_1m_currency", 60_000, GroupBy::Currency),
            WindowSpec::tumbling("tumbling_1m_region", 60_000, GroupBy::Region),
            WindowSpec::sliding("sliding_5m_1m_region", 300_000, 60_000, GroupBy::Region),
            WindowSpec::session("session_30m_customer", 1_800_000),
        ]
    }

    /// Checks the spec; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(format!(
                "window name {:?} must be non-empty and use only [A-Za-z0-9_-]",
                self.name
            ));
        }
        match self.kind {
            WindowKind::Tumbling { size_ms } if size_ms <= 0 => {
                Err(format!("window {}: size_ms must be > 0", self.name))
            }
            WindowKind::Sliding { size_ms, slide_ms } if size_ms <= 0 || slide_ms <= 0 => Err(
                format!("window {}: size_ms and slide_ms must be > 0", self.name),
            ),
            WindowKind::Sliding { size_ms, slide_ms } if size_ms % slide_ms != 0 => Err(format!(
                "window {}: size_ms ({size_ms}) must be a multiple of slide_ms ({slide_ms})",
                self.name
            )),
            WindowKind::Session { gap_ms } if gap_ms <= 0 => {
                Err(format!("window {}: gap_ms must be > 0", self.name))
            }
            WindowKind::Session { .. } if self.by != GroupBy::Customer => Err(format!(
                "window {}: sessions are per customer (by = \"customer\")",
                self.name
            )),
            WindowKind::Tumbling { size_ms }
            | WindowKind::Sliding { size_ms, .. }
            | WindowKind::Session { gap_ms: size_ms }
                if size_ms > crate::engine::MAX_DURATION_MS =>
            {
                Err(format!(
                    "window {}: {size_ms} ms is longer than ten years ({} ms)",
                    self.name,
                    crate::engine::MAX_DURATION_MS
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Parses a comma-separated list of window definitions:
/// `tumbling:NAME:SIZE_MS:BY`, `sliding:NAME:SIZE_MS:SLIDE_MS:BY`,
/// `session:NAME:GAP_MS` (BY is currency, region or customer).
pub fn parse_window_list(text: &str) -> Result<Vec<WindowSpec>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let f: Vec<&str> = item.split(':').collect();
        let ms = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| format!("{item:?}: {s:?} is not a whole number of milliseconds"))
        };
        let by = |s: &str| {
            GroupBy::parse(s)
                .ok_or_else(|| format!("{item:?}: group {s:?} is not currency, region or customer"))
        };
        let spec = match f.as_slice() {
            ["tumbling", name, size, b] => WindowSpec::tumbling(name, ms(size)?, by(b)?),
            ["sliding", name, size, slide, b] => WindowSpec::sliding(name, ms(size)?, ms(slide)?, by(b)?),
            ["session", name, gap] => WindowSpec::session(name, ms(gap)?),
            _ => {
                return Err(format!(
                    "{item:?} is not tumbling:NAME:SIZE:BY, sliding:NAME:SIZE:SLIDE:BY or session:NAME:GAP"
                ))
            }
        };
        spec.validate()?;
        out.push(spec);
    }
    if out.is_empty() {
        return Err("at least one window is required".into());
    }
    Ok(out)
}

/// The inverse of [`parse_window_list`].
pub fn format_window_list(specs: &[WindowSpec]) -> String {
    specs
        .iter()
        .map(|s| match s.kind {
            WindowKind::Tumbling { size_ms } => format!("tumbling:{}:{size_ms}:{}", s.name, s.by),
            WindowKind::Sliding { size_ms, slide_ms } => {
                format!("sliding:{}:{size_ms}:{slide_ms}:{}", s.name, s.by)
            }
            WindowKind::Session { gap_ms } => format!("session:{}:{gap_ms}", s.name),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Start of the tumbling window of `size` that holds `t`.
pub fn tumbling_start(t: i64, size: i64) -> i64 {
    t - t.rem_euclid(size)
}

/// Starts of the sliding windows that hold `t`, newest first.
pub fn sliding_starts(t: i64, size: i64, slide: i64) -> impl Iterator<Item = i64> {
    let last = tumbling_start(t, slide);
    let n = size / slide;
    (0..n).map(move |i| last - i * slide)
}

/// The `[start, end)` windows of a fixed-grid kind that hold `t`.
/// Empty for sessions.
pub fn assign(kind: &WindowKind, t: i64) -> Vec<(i64, i64)> {
    match *kind {
        WindowKind::Tumbling { size_ms } => {
            let s = tumbling_start(t, size_ms);
            vec![(s, s + size_ms)]
        }
        WindowKind::Sliding { size_ms, slide_ms } => sliding_starts(t, size_ms, slide_ms)
            .map(|s| (s, s + size_ms))
            .collect(),
        WindowKind::Session { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumbling_is_half_open_and_epoch_aligned() {
        assert_eq!(
            assign(&WindowKind::Tumbling { size_ms: 60_000 }, 0),
            vec![(0, 60_000)]
        );
        assert_eq!(
            assign(&WindowKind::Tumbling { size_ms: 60_000 }, 59_999),
            vec![(0, 60_000)]
        );
        // An event exactly at a window's end belongs to the next window.
        assert_eq!(
            assign(&WindowKind::Tumbling { size_ms: 60_000 }, 60_000),
            vec![(60_000, 120_000)]
        );
        assert_eq!(
            assign(&WindowKind::Tumbling { size_ms: 60_000 }, -1),
            vec![(-60_000, 0)]
        );
    }

    #[test]
    fn sliding_assigns_size_over_slide_windows() {
        let w = assign(
            &WindowKind::Sliding {
                size_ms: 300,
                slide_ms: 100,
            },
            250,
        );
        assert_eq!(w, vec![(200, 500), (100, 400), (0, 300)]);
        let at_edge = assign(
            &WindowKind::Sliding {
                size_ms: 300,
                slide_ms: 100,
            },
            300,
        );
        assert_eq!(at_edge, vec![(300, 600), (200, 500), (100, 400)]);
        for (s, e) in &at_edge {
            assert!(*s <= 300 && 300 < *e);
        }
    }

    #[test]
    fn window_lists_round_trip_and_reject_nonsense() {
        let d = WindowSpec::defaults();
        assert_eq!(parse_window_list(&format_window_list(&d)).unwrap(), d);
        assert!(parse_window_list("tumbling:x:abc:region")
            .unwrap_err()
            .contains("whole number"));
        assert!(parse_window_list("tumbling:x:10:planet")
            .unwrap_err()
            .contains("planet"));
        assert!(parse_window_list("hopping:x:10")
            .unwrap_err()
            .contains("is not"));
        assert!(parse_window_list(" ").is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(WindowSpec::sliding("x", 300, 70, GroupBy::Region)
            .validate()
            .unwrap_err()
            .contains("multiple"));
        assert!(WindowSpec::tumbling("bad name", 1, GroupBy::Region)
            .validate()
            .is_err());
        let mut s = WindowSpec::session("s", 10);
        s.by = GroupBy::Region;
        assert!(s.validate().unwrap_err().contains("per customer"));
        for d in WindowSpec::defaults() {
            d.validate().unwrap();
        }
    }
}
