//! `credgate audit`: prints the audit log as JSON lines, straight from the database, and
//! `credgate audit prune --before` trims it (the only way events are ever deleted).

use std::io::{self, Write};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::DatabaseArgs;
use credgate::attributes::format_time;
use credgate::audit::EventQuery;
use credgate::credential::ApiKey;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct AuditArgs {
    #[command(subcommand)]
    action: Option<Action>,
    /// Only the events of this credential.
    #[arg(long, value_parser = api_key)]
    api_key: Option<ApiKey>,
    /// Only events after this id (an event's `id`, or `next` from `GET /audit`).
    #[arg(long)]
    after: Option<u64>,
    /// At most this many events.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    #[command(flatten)]
    db: DatabaseArgs,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Delete the events written before a time (RFC 3339, e.g. 2026-01-01T00:00:00Z).
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
struct PruneArgs {
    /// Events written before this time are deleted; it may not be in the future.
    #[arg(long, value_parser = timestamp)]
    before: DateTime<Utc>,
    #[command(flatten)]
    db: DatabaseArgs,
}

const PAGE: u32 = 1000;

pub(super) async fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    if let Some(Action::Prune(prune)) = args.action {
        return run_prune(prune).await;
    }
    let store = args.db.open_existing().await?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut left = args.limit;
    let mut query = EventQuery {
        api_key: args.api_key,
        after: args.after.map(i64::try_from).transpose()?,
        limit: PAGE,
    };
    loop {
        if let Some(left) = left {
            query.limit = PAGE.min(u32::try_from(left).unwrap_or(PAGE));
        }
        let page = store.events(&query).await?;
        for event in &page {
            if !super::json_line(&mut out, event)? {
                return Ok(ExitCode::SUCCESS);
            }
        }
        left = left.map(|n| n - page.len() as u64);
        match page.last() {
            Some(last) if page.len() == query.limit as usize && left != Some(0) => {
                query.after = Some(last.id);
            }
            _ => break,
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn run_prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    if args.before > Utc::now() {
        anyhow::bail!(
            "--before {} is in the future: pruning would delete events written since",
            format_time(&args.before)
        );
    }
    let store = args.db.open_existing().await?;
    let pruned = store.prune_events(args.before).await?;
    println!(
        "{}",
        serde_json::json!({ "pruned": pruned, "before": format_time(&args.before) })
    );
    Ok(ExitCode::SUCCESS)
}

fn api_key(text: &str) -> Result<ApiKey, String> {
    ApiKey::parse(text).map_err(|e| format!("not an api_key: {e}"))
}

fn timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time (e.g. 2026-01-01T00:00:00Z): {e}"))
}
