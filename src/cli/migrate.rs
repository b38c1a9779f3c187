//! `credgate migrate`: applies the embedded migrations to the database.

use std::process::ExitCode;

use clap::Args;

use super::DatabaseArgs;
use crate::store::{DatabaseTarget, sqlite::SqliteStore};

#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    #[command(flatten)]
    db: DatabaseArgs,
}

pub(super) async fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    match args.db.target()? {
        DatabaseTarget::Sqlite(path) => {
            if args.db.explicit()?.is_none() {
                crate::config::ensure_data_dir(&args.db.data.data_dir)?;
            }
            SqliteStore::migrate(&path).await?;
            eprintln!("schema is up to date in {}", path.display());
        }
        DatabaseTarget::Postgres(_) => {
            anyhow::bail!("PostgreSQL is not supported by this build yet; use sqlite://")
        }
    }
    Ok(ExitCode::SUCCESS)
}
