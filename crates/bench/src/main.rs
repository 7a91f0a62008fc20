//! `tally-bench`: the measured scenarios, one JSON line each. Kept out of
//! the production binary; run as `cargo run -p tally-bench -- --scenario …`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, ValueEnum};
use tally::config::PodConfig;
use tally::kafka::topics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Full-job throughput for several flush settings.
    Flush,
    /// `/revenue` latency and freshness while ingesting at `--rate`.
    Serving,
    /// Raw consume rate vs. the full job, in one run.
    Ceiling,
    /// One partition of `--rows` state rows restored from the changelog (needs `--brokers`).
    Restore,
    /// Produce → window update visible, at `--rate` for `--seconds`.
    Latency,
    /// Peak memory of a `tally run` child holding `--customers` open sessions.
    Rss,
    /// The serving view's memory per window, and a new view's catch-up time.
    View,
    /// The pass-through pipe and the full job (a `tally run` child) over the
    /// same `--events`, in one run on `--brokers`: events/s and CPU per event.
    Throughput,
    /// End-to-end latency and `/revenue` latency with the broker
    /// (`--brokers`), the job (a `tally run` child) and the load (this
    /// process) apart: `--rate` orders/s, `--rps` requests/s, `--seconds`.
    Loaded,
}

/// tally's benchmark scenarios on the embedded broker.
#[derive(Parser, Debug)]
#[command(name = "tally-bench", version, about)]
struct Args {
    #[arg(long, value_enum, default_value = "flush")]
    scenario: Scenario,
    /// serving, latency, loaded: ingest rate, events/s.
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// serving, loaded: /revenue requests per second.
    #[arg(long, default_value_t = 1_000.0)]
    rps: f64,
    /// serving, latency: duration, seconds.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Input records per run.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Topic declarations; the ones compiled into tally by default.
    #[arg(long)]
    topics_dir: Option<PathBuf>,
    /// restore: state rows in the partition.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// rss: distinct customers, each with an open session; view: customers of the generated orders.
    #[arg(long, default_value_t = 1_000_000)]
    customers: u64,
    /// rss: orders (each a live dedup entry), spread over the customers;
    /// by default one a customer.
    #[arg(long)]
    orders: Option<u64>,
    /// rss: the event times span this many minutes, ending now (under the
    /// 30-minute session gap, so every session is still open at the end).
    /// The tumbling and sliding windows' customer sets hold the distinct
    /// customers of their last minutes, so a shorter span packs more of
    /// them into each window.
    #[arg(long, default_value_t = 10)]
    span_minutes: u64,
    /// restore: an external broker (the embedded one keeps ~5 MiB per partition).
    #[arg(long = "brokers")]
    external_brokers: Option<String>,
    /// rss, throughput: the `tally` binary to measure; by default the one built beside this one.
    #[arg(long)]
    tally_bin: Option<PathBuf>,
    /// throughput: one job per entry, with that many engine threads
    /// (loaded: the first entry).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// throughput: the Python interpreter of a venv with quixstreams, to
    /// run the Quix Streams peer in the same run (`benches/throughput.sh`
    /// makes one).
    #[arg(long)]
    quix_python: Option<PathBuf>,
    /// throughput: the peer's job.
    #[arg(long, default_value = "benches/peers/quix_job.py")]
    quix_job: PathBuf,
}

/// The `tally` binary a scenario runs as a child: `--tally-bin`, else the
/// one built beside this one.
fn tally_exe(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(p) => p,
        None => tally_bench::sibling_tally_binary()?,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tally::telemetry::init_logging(tally::telemetry::log_format_from_env());
    let specs = topics::load(args.topics_dir.as_deref())?;
    let base = PodConfig::from_env_and_defaults()?;
    match args.scenario {
        Scenario::Flush => {
            tally_bench::flush_sweep(&specs, &base, args.events)?;
        }
        Scenario::Serving => println!(
            "{}",
            tally_bench::serving(&specs, &base, args.rate, args.rps, args.seconds)?
        ),
        Scenario::Ceiling => println!("{}", tally_bench::ceiling(&specs, &base, args.events)?),
        Scenario::Restore => {
            let Some(b) = args.external_brokers else {
                bail!("--scenario restore needs --brokers: the embedded broker keeps only about 5 MiB per partition")
            };
            println!("{}", tally_bench::restore(&specs, &base, args.rows, &b)?);
        }
        Scenario::Latency => println!(
            "{}",
            tally_bench::latency(&specs, &base, args.rate, args.seconds)?
        ),
        Scenario::Rss => {
            let exe = tally_exe(args.tally_bin)?;
            let orders = args.orders.unwrap_or(args.customers);
            println!(
                "{}",
                tally_bench::rss(
                    &specs,
                    &base,
                    args.customers,
                    orders,
                    args.span_minutes,
                    &exe,
                )?
            );
        }
        Scenario::Throughput => {
            let Some(b) = args.external_brokers else {
                bail!("--scenario throughput needs --brokers (tansu in memory: run it as its own process)")
            };
            let exe = tally_exe(args.tally_bin)?;
            println!(
                "{}",
                tally_bench::throughput(
                    &specs,
                    &base,
                    &tally_bench::Throughput {
                        events: args.events,
                        brokers: &b,
                        tally: &exe,
                        prefix: &format!("bench{}-", tally::pod::now_ms()),
                        apply: true,
                        threads: &args.threads,
                        quix: args
                            .quix_python
                            .as_deref()
                            .map(|p| (p, args.quix_job.as_path())),
                    },
                )?
            );
        }
        Scenario::Loaded => {
            let Some(b) = args.external_brokers else {
                bail!("--scenario loaded needs --brokers (the broker as its own process)")
            };
            let exe = tally_exe(args.tally_bin)?;
            let threads = args.threads.first().copied().unwrap_or(1);
            println!(
                "{}",
                tally_bench::loaded(
                    &specs,
                    &base,
                    &tally_bench::Loaded {
                        brokers: &b,
                        tally: &exe,
                        rate: args.rate,
                        rps: args.rps,
                        seconds: args.seconds,
                        threads,
                        prefix: &format!("loaded{}-", tally::pod::now_ms()),
                        apply: true,
                    },
                )?
            );
        }
        Scenario::View => {
            println!(
                "{}",
                tally_bench::view(&specs, &base, args.events, args.customers)?
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_scenario_is_refused_with_the_known_ones() {
        let e = Args::try_parse_from(["tally-bench", "--scenario", "nope"]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("nope") && msg.contains("ceiling"), "{msg}");
    }
}
