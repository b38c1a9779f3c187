//! `credgate migrate`: applies the embedded migrations to the database.

use std::process::ExitCode;

use clap::Args;

use super::DatabaseArgs;
use credgate::store::{self, DatabaseTarget};

#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    #[command(flatten)]
    db: DatabaseArgs,
}

pub(super) async fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let target = args.db.target()?;
    if args.db.explicit()?.is_none() {
        credgate::config::ensure_data_dir(&args.db.data.data_dir)?;
    }
    store::migrate(&target).await?;
    match target {
        DatabaseTarget::Sqlite(path) => eprintln!("schema is up to date in {}", path.display()),
        DatabaseTarget::Postgres(_) => eprintln!("schema is up to date in PostgreSQL"),
    }
    Ok(ExitCode::SUCCESS)
}
