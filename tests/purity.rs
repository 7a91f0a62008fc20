//! The architecture invariant of the core crate (`crates/core`,
//! `tally-core`): no IO, no clock, no adapters.
//!
//! Two checks. The compiler's: `tally-core`'s dependency tree, read from
//! `Cargo.lock`, holds no IO crate, not even transitively (so the core
//! cannot call one). The text's: every file under `crates/core/src` is read
//! and the test fails on any use of an
//! adapter crate (tokio, rdkafka, rocksdb, axum, prometheus, tracing) or of
//! the standard library's clock, file system, network, process, thread or
//! environment APIs. Time must enter the core as a value.

use std::fs;
use std::path::{Path, PathBuf};

const FORBIDDEN: &[(&str, &str)] = &[
    ("tokio", "async runtime"),
    ("rdkafka", "Kafka client"),
    ("rocksdb", "storage engine"),
    ("axum", "HTTP server"),
    ("hyper", "HTTP"),
    ("prometheus", "metrics"),
    ("tracing", "logging is the shell's job"),
    ("std::time", "clock"),
    ("SystemTime", "clock"),
    ("Instant", "clock"),
    ("Utc::now", "clock"),
    ("Local::now", "clock"),
    ("::now(", "clock"),
    ("std::fs", "file system"),
    ("std::net", "network"),
    ("std::io", "IO"),
    ("std::process", "processes"),
    ("std::thread", "threads"),
    ("std::env", "environment"),
    ("println!", "IO"),
    ("eprintln!", "IO"),
    ("rand", "randomness is input, not a side channel"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("the source directory exists") {
        let path = entry.expect("readable dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// True when `needle` occurs in `line` as a whole identifier path (so
/// `rand` does not match `operand`).
fn mentions(line: &str, needle: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(needle).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + needle.len()..].chars().next();
        let starts_ident = needle.chars().next().is_some_and(ident);
        let ends_ident = needle.chars().next_back().is_some_and(ident);
        (!starts_ident || !before.is_some_and(ident)) && (!ends_ident || !after.is_some_and(ident))
    })
}

fn violations(src: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, raw) in src.lines().enumerate() {
        let line = raw.split("//").next().unwrap_or("");
        for (needle, why) in FORBIDDEN {
            if mentions(line, needle) {
                found.push(format!(
                    "line {}: `{}` ({why}): {}",
                    n + 1,
                    needle,
                    raw.trim()
                ));
            }
        }
    }
    found
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/core/src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(
        files.len() >= 5,
        "expected the core's modules under {}",
        root.display()
    );
    let mut all = Vec::new();
    for f in files {
        let src = fs::read_to_string(&f).expect("readable source");
        for v in violations(&src) {
            all.push(format!("{}: {v}", f.display()));
        }
    }
    assert!(
        all.is_empty(),
        "the core must stay pure:\n{}",
        all.join("\n")
    );
}

#[test]
fn the_checker_catches_what_it_should() {
    assert_eq!(violations("use tokio::sync::mpsc;").len(), 1);
    assert_eq!(violations("let t = std::time::SystemTime::now();").len(), 3);
    assert_eq!(violations("let n = chrono::Utc::now();").len(), 2);
    assert_eq!(violations("use std::fs::File;").len(), 1);
    assert!(violations("let operand = brand; // tokio in a comment").is_empty());
    assert!(violations("fn instantiate() {}").is_empty());
}

/// Crates that do IO (or are the adapters themselves): none may be in the
/// core's dependency tree.
const IO_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "rdkafka",
    "rdkafka-sys",
    "rocksdb",
    "librocksdb-sys",
    "axum",
    "hyper",
    "prometheus",
    "tracing",
    "tracing-subscriber",
];

/// Every package `root` depends on, transitively, per `Cargo.lock`.
fn locked_tree(lock: &str, root: &str) -> std::collections::BTreeSet<String> {
    let lock: toml::Table = toml::from_str(lock).expect("Cargo.lock is TOML");
    let packages = lock["package"].as_array().expect("[[package]] entries");
    let deps_of = |name: &str| -> Vec<String> {
        packages
            .iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .flat_map(|p| {
                p.get("dependencies")
                    .and_then(|d| d.as_array())
                    .cloned()
                    .unwrap_or_default()
            })
            // "name" or "name version" (when several versions are locked).
            .filter_map(|d| {
                d.as_str()
                    .map(|s| s.split(' ').next().unwrap_or(s).to_string())
            })
            .collect()
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(n) = todo.pop() {
        for d in deps_of(&n) {
            if seen.insert(d.clone()) {
                todo.push(d);
            }
        }
    }
    seen
}

#[test]
fn the_core_crate_depends_on_no_io_crate() {
    let lock = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock"))
        .expect("Cargo.lock at the workspace root");
    let tree = locked_tree(&lock, "tally-core");
    assert!(tree.contains("serde"), "the tree was read: {tree:?}");
    let bad: Vec<&str> = IO_CRATES
        .iter()
        .copied()
        .filter(|c| tree.contains(*c))
        .collect();
    assert!(bad.is_empty(), "tally-core depends on IO crates {bad:?}");
    // The check can fail: the shell's tree has them.
    assert!(locked_tree(&lock, "tally").contains("rdkafka"));
}

/// Every Kafka client of the shell is made by `kafka::Clients`, so the
/// user's `--kafka-properties` (TLS, SASL, …) reach all of them. Before
/// the factory, the changelog restore reader was made by hand and did not
/// get them: on a TLS or SASL cluster every restore failed.
#[test]
fn every_kafka_client_is_made_by_the_factory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let allowed = [root.join("kafka/mod.rs"), root.join("kafka/broker.rs")];
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !allowed.contains(f)) {
        let src = fs::read_to_string(f).expect("readable source");
        for (n, line) in src.lines().enumerate() {
            if line
                .split("//")
                .next()
                .unwrap_or("")
                .contains("ClientConfig::new(")
            {
                found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(files.len() > 10, "read the shell's sources");
    assert!(
        found.is_empty(),
        "make clients with tally::kafka::Clients:\n{}",
        found.join("\n")
    );
}
