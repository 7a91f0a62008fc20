//! The architecture invariant of `src/core`: no IO, no clock, no adapters.
//!
//! This test reads every file under `src/core` and fails on any use of an
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
    for entry in fs::read_dir(dir).expect("src/core exists") {
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
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
