//! The `credgate` binary: parses the command line and runs one subcommand. The command line
//! lives here, not in the library, so the library carries no clap.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;

mod cli;

/// jemalloc rather than the system allocator: with glibc's, `malloc` and `free` were a fifth
/// of the async runtime's CPU in a durable registration (their consolidation of small
/// freed chunks, and chunks freed on another thread than the one that allocated them: the
/// writer's). Measured in BENCHMARKS.md, with the RSS target still met.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Longest the exit waits for work left in the async runtime once the command has finished.
const RUNTIME_SHUTDOWN_LIMIT: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("credgate: error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(cli.run());
    // Dropping the runtime would wait, without limit, for blocking-pool work still running (a
    // DNS lookup for a database reconnection, say); the command is done, so bound that wait.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_LIMIT);
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the whole cause chain, joined.
            eprintln!("credgate: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
