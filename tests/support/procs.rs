//! Pods as child processes, and a tiny HTTP client for their endpoints.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Pod {
    pub child: Child,
    pub port: u16,
    pub name: String,
}

/// Sends SIGTERM to `child` and waits for it to exit, at most 30 s (a
/// Kubernetes pod's default grace period); returns how it exited.
pub fn sigterm_and_wait(child: &mut Child, name: &str) -> std::process::ExitStatus {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not stop within 30 s of SIGTERM"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// `tally run` as a child process, logging to `log`.
pub fn spawn_pod(name: &str, brokers: &str, group: &str, state: &Path, log: &Path) -> Pod {
    spawn_pod_env(name, brokers, group, state, log, &[])
}

/// [`spawn_pod`] with more environment (`TALLY_*` settings).
pub fn spawn_pod_env(
    name: &str,
    brokers: &str,
    group: &str,
    state: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> Pod {
    let port = free_port();
    let child = pod_command(name, brokers, group, state, log, port)
        .envs(env.iter().copied())
        .spawn()
        .expect("spawn tally run");
    Pod {
        child,
        port,
        name: name.to_string(),
    }
}

/// The `tally run` command of [`spawn_pod`], serving on `port`, for a
/// test that must change how the process starts; its log is `log` with
/// the extension `<name>.log`.
pub fn pod_command(
    name: &str,
    brokers: &str,
    group: &str,
    state: &Path,
    log: &Path,
    port: u16,
) -> Command {
    // One log per pod name, beside `log`.
    let log = log.with_extension(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(tally_bin());
    command
        .args([
            "run",
            "--brokers",
            brokers,
            "--group",
            &super::kafka::group(group),
        ])
        .args(super::kafka::topic_args())
        .args(["--http", &format!("127.0.0.1:{port}")])
        .args([
            "--apply-topics=false",
            "--session-timeout-ms",
            "3000",
            "--flush-interval-ms",
            "50",
        ])
        // Eager rebalancing: the mock cluster mishandles cooperative-sticky
        // with several members (see --assignment-strategy).
        .args(["--assignment-strategy", "range"])
        .arg("--state-dir")
        .arg(state)
        .env("TALLY_LOG", "warn,tally=debug,tally::pod=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    command
}

/// A pod outlives no test: a test that fails (panics) kills its pods on
/// the way out, or they would go on retrying a broker that is gone, using
/// the CPU of every test after it.
impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pod {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        let s = sigterm_and_wait(&mut self.child, &self.name);
        assert!(s.success(), "{} exited with {s} after SIGTERM", self.name);
    }

    pub fn assert_alive(&mut self, log: &Path) {
        if let Some(s) = self.child.try_wait().unwrap() {
            // The pod's own log, beside `log` (see `spawn_pod`).
            let own = log.with_extension(format!("{}.log", self.name));
            let text = std::fs::read_to_string(&own).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            panic!(
                "{} exited by itself ({s}); the end of {}:\n{}",
                self.name,
                own.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    pub fn get(&self, path: &str) -> Option<(u16, serde_json::Value)> {
        http_get(self.port, path)
    }
}

/// A blocking HTTP/1.0 GET on loopback: (status, body text).
fn get_raw(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split("\r\n\r\n").nth(1)?.to_string()))
}

/// A blocking HTTP/1.0 GET on loopback: (status, JSON body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = get_raw(port, path)?;
    Some((
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    ))
}

/// A blocking HTTP/1.0 GET on loopback: the body as text.
pub fn http_get_text(port: u16, path: &str) -> Option<String> {
    get_raw(port, path).map(|(_, body)| body)
}

/// The value of an unlabelled metric on a pod's `/metrics`.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    http_get_text(port, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `tally` binary the tests start: this build's, or `TALLY_TEST_BIN`
/// (a copy, so a long soak can run while the tree is rebuilt).
pub fn tally_bin() -> String {
    std::env::var("TALLY_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tally").to_string())
}
