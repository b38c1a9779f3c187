//! `credgate issue`: mints pairs offline (the vendor console's job).

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::{DataDirArgs, MasterKeyArgs};
use credgate::config::WhenMissing;
use credgate::credential::ApiKey;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// One JSON object per line: {"api_key": …, "api_secret": …}.
    Json,
    /// CREDGATE_API_KEY=… and CREDGATE_API_SECRET=… lines, a blank line between pairs.
    Env,
}

#[derive(Debug, Args)]
pub(super) struct IssueArgs {
    /// How many pairs to mint.
    #[arg(long, env = "CREDGATE_COUNT", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Output format.
    #[arg(long, env = "CREDGATE_FORMAT", value_enum, default_value_t = Format::Json)]
    format: Format,
    #[command(flatten)]
    key: MasterKeyArgs,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Counts large enough to be worth a progress line on a terminal.
const PROGRESS_FROM: u64 = 10_000;

pub(super) fn run(args: IssueArgs) -> anyhow::Result<ExitCode> {
    let keys = args.key.load(&args.data, WhenMissing::Generate)?;
    let deriver = keys.minting();
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let progress = args.count >= PROGRESS_FROM && io::stderr().is_terminal();
    let step = (args.count / 100).max(1);
    for i in 0..args.count {
        let key = ApiKey::generate();
        let secret = deriver.secret_for(&key).expose();
        let written = match args.format {
            Format::Json => writeln!(
                out,
                "{}",
                serde_json::json!({ "api_key": key.as_str(), "api_secret": secret })
            ),
            Format::Env => {
                let sep = if i == 0 { "" } else { "\n" };
                write!(
                    out,
                    "{sep}CREDGATE_API_KEY={key}\nCREDGATE_API_SECRET={secret}\n"
                )
            }
        };
        if let Err(e) = written {
            // The reader went away (e.g. `| head`): stop quietly.
            if e.kind() == io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e.into());
        }
        if progress && (i + 1) % step == 0 {
            eprint!("\rissued {}/{}", i + 1, args.count);
        }
    }
    if progress {
        eprintln!();
    }
    match out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}
