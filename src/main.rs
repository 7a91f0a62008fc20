//! The `tally` command line. Startup and wiring only: semantics live in
//! `tally::core`, adapters in their own modules.

use clap::{Parser, Subcommand};

/// tally: live, exact order revenue from Kafka.
#[derive(Parser, Debug)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Embedded broker, topics, load generator, one pod and the HTTP server in one process.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            println!("tally demo: not yet available (the consumer pod is the next step)");
            Ok(())
        }
    }
}
