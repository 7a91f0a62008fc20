//! Sizing RocksDB's memory from the container's memory limit.
//!
//! A pod in Kubernetes is OOM-killed when its cgroup exceeds its limit, and
//! RocksDB's block cache and memtables are the only parts of tally whose size
//! is a setting rather than a consequence of the load. So they get a fixed
//! share of the limit, and everything else (the engine's open windows, the
//! serving view, librdkafka's queues) keeps the rest:
//!
//! ```text
//! budget            = limit × rocksdb_memory_fraction      (default 0.25)
//! block_cache       = budget / 2                           (index and filter blocks included)
//! write_buffer_size = budget / 4 / max_write_buffer_number (2 memtables)
//! ```
//!
//! so RocksDB stays within `budget` (the memtables take at most `budget / 4`
//! and leave head room for the one being flushed). The limit is read from
//! cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`), unless
//! `memory_limit_bytes` sets it; with no limit at all, a 1 GiB limit is
//! assumed.

use std::path::Path;

/// The limit assumed when neither the cgroup nor the config sets one.
pub const DEFAULT_LIMIT_BYTES: u64 = 1 << 30;
/// RocksDB memtables per column family.
pub const MAX_WRITE_BUFFERS: i32 = 2;
/// Below this, RocksDB's own minimum sizes dominate.
const MIN_BUDGET_BYTES: u64 = 16 << 20;

/// Where the limit came from, for the startup log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSource {
    Config,
    CgroupV2,
    CgroupV1,
    Default,
}

/// RocksDB's memory settings, derived from one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RocksSizing {
    pub limit_bytes: u64,
    pub source: LimitSource,
    pub budget_bytes: u64,
    pub block_cache_bytes: u64,
    pub write_buffer_bytes: u64,
    pub max_write_buffers: i32,
    /// Dedup entries the engine keeps in memory (besides those not yet
    /// durable): a quarter of the limit at [`DEDUP_ENTRY_BYTES`] each.
    pub dedup_cache_entries: u64,
    /// Session sets (a customer's sessions of one definition) the engine
    /// keeps in memory (besides those not yet durable or awaiting a
    /// purge): an eighth of the limit at [`SESSION_SET_BYTES`] each.
    pub session_cache_sets: u64,
}

/// What a dedup entry costs in the engine's memory, measured: about 400
/// bytes with its expiry index.
pub const DEDUP_ENTRY_BYTES: u64 = 400;

/// What a held session set costs: the set, its aggregate's small vectors,
/// its key and its entry in the closing index (measured with a
/// million open sessions held in memory: about 600 bytes of the 1.4 KB a
/// customer cost).
pub const SESSION_SET_BYTES: u64 = 600;

impl RocksSizing {
    /// The settings for a limit (`fraction` in (0, 1], checked by the config).
    pub fn for_limit(limit_bytes: u64, source: LimitSource, fraction: f64) -> RocksSizing {
        RocksSizing {
            limit_bytes,
            source,
            budget_bytes: 0,
            block_cache_bytes: 0,
            write_buffer_bytes: 0,
            max_write_buffers: MAX_WRITE_BUFFERS,
            dedup_cache_entries: limit_bytes / 4 / DEDUP_ENTRY_BYTES,
            session_cache_sets: limit_bytes / 8 / SESSION_SET_BYTES,
        }
        .with_budget((limit_bytes as f64 * fraction) as u64)
    }

    /// RocksDB's budget (at least [`MIN_BUDGET_BYTES`]) and its split:
    /// half block cache, a quarter memtables.
    fn with_budget(self, budget: u64) -> RocksSizing {
        let budget = budget.max(MIN_BUDGET_BYTES);
        RocksSizing {
            budget_bytes: budget,
            block_cache_bytes: budget / 2,
            write_buffer_bytes: budget / 4 / MAX_WRITE_BUFFERS as u64,
            ..self
        }
    }

    /// One engine thread's share when `threads` share the pod (each has
    /// its own RocksDB and caches, and together they keep to the limit).
    pub fn shared_by(self, threads: usize) -> RocksSizing {
        let n = threads.max(1) as u64;
        RocksSizing {
            dedup_cache_entries: self.dedup_cache_entries / n,
            session_cache_sets: self.session_cache_sets / n,
            ..self
        }
        .with_budget(self.budget_bytes / n)
    }

    /// The settings for this process: the configured limit, else the cgroup's
    /// (read under `cgroup_root`, normally `/sys/fs/cgroup`), else the default.
    pub fn detect(configured: Option<u64>, cgroup_root: &Path, fraction: f64) -> RocksSizing {
        let (limit, source) = match configured {
            Some(l) => (l, LimitSource::Config),
            None => {
                cgroup_limit(cgroup_root).unwrap_or((DEFAULT_LIMIT_BYTES, LimitSource::Default))
            }
        };
        RocksSizing::for_limit(limit, source, fraction)
    }
}

/// The memory limit of the cgroup this process runs in, if it has one.
///
/// cgroup v2 writes `max` for "no limit"; v1 writes a huge number (the page
/// counter's maximum), so anything at or above 2^60 counts as unlimited.
pub fn cgroup_limit(root: &Path) -> Option<(u64, LimitSource)> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    if let Some(s) = read(&root.join("memory.max")) {
        return parse_limit(&s).map(|l| (l, LimitSource::CgroupV2));
    }
    if let Some(s) = read(&root.join("memory").join("memory.limit_in_bytes")) {
        return parse_limit(&s).map(|l| (l, LimitSource::CgroupV1));
    }
    None
}

fn parse_limit(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    s.parse::<u64>().ok().filter(|&l| l > 0 && l < 1 << 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_splits_the_budget() {
        let s = RocksSizing::for_limit(2 << 30, LimitSource::Config, 0.25);
        assert_eq!(s.budget_bytes, 512 << 20);
        assert_eq!(s.block_cache_bytes, 256 << 20);
        assert_eq!(s.write_buffer_bytes, 64 << 20);
        assert!(
            s.block_cache_bytes + s.write_buffer_bytes * s.max_write_buffers as u64
                <= s.budget_bytes
        );
    }

    #[test]
    fn threads_share_the_budget_and_the_caches() {
        let whole = RocksSizing::for_limit(2 << 30, LimitSource::Config, 0.25);
        let one = whole.shared_by(1);
        assert_eq!(one, whole);
        let half = whole.shared_by(2);
        assert_eq!(half.limit_bytes, whole.limit_bytes);
        assert_eq!(half.budget_bytes, whole.budget_bytes / 2);
        assert_eq!(half.block_cache_bytes, whole.block_cache_bytes / 2);
        assert_eq!(half.write_buffer_bytes, whole.write_buffer_bytes / 2);
        assert_eq!(half.dedup_cache_entries, whole.dedup_cache_entries / 2);
        assert_eq!(half.session_cache_sets, whole.session_cache_sets / 2);
    }

    #[test]
    fn tiny_limits_keep_a_floor() {
        let s = RocksSizing::for_limit(10 << 20, LimitSource::Config, 0.1);
        assert_eq!(s.budget_bytes, MIN_BUDGET_BYTES);
    }

    #[test]
    fn reads_cgroup_v2_and_v1() {
        let dir = std::env::temp_dir().join(format!("tally-cg-{}", std::process::id()));
        let v2 = dir.join("v2");
        let v1 = dir.join("v1");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::create_dir_all(v1.join("memory")).unwrap();
        std::fs::write(v2.join("memory.max"), "1073741824\n").unwrap();
        std::fs::write(
            v1.join("memory").join("memory.limit_in_bytes"),
            "536870912\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit(&v2), Some((1 << 30, LimitSource::CgroupV2)));
        assert_eq!(cgroup_limit(&v1), Some((512 << 20, LimitSource::CgroupV1)));

        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit(&v2), None);
        std::fs::write(
            v1.join("memory").join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(cgroup_limit(&v1), None);
        assert_eq!(cgroup_limit(&dir.join("absent")), None);

        let s = RocksSizing::detect(None, &dir.join("absent"), 0.25);
        assert_eq!(
            (s.limit_bytes, s.source),
            (DEFAULT_LIMIT_BYTES, LimitSource::Default)
        );
        let s = RocksSizing::detect(Some(4 << 30), &v2, 0.5);
        assert_eq!((s.budget_bytes, s.source), (2 << 30, LimitSource::Config));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
