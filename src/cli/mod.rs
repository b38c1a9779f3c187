//! The `credgate` command line (SPEC §4): a clap `Command` enum with one module per
//! subcommand, each with its own `run`. Every flag also reads a `CREDGATE_*` variable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use credgate::config::{self, DEFAULT_DATA_DIR, WhenMissing};
use credgate::credential::KeyRing;
use credgate::store::{self, CredentialStore, DatabaseTarget};
use credgate::telemetry::{self, LogFormat, Metrics};

mod audit;
mod issue;
mod keygen;
mod keys;
mod list;
mod migrate;
mod revoke;
mod scan;
mod serve;
mod verify;

/// credgate: self-hosted API credentials — derived key/secret pairs, revocation, fast auth.
#[derive(Debug, Parser)]
#[command(name = "credgate", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(serve::ServeArgs),
    /// Mint credential pairs offline with the master key.
    Issue(issue::IssueArgs),
    /// Write a new random master key.
    Keygen(keygen::KeygenArgs),
    /// Print the ids of the configured master keys (never the keys), the minting one first.
    Keys(keys::KeysArgs),
    /// Check a pair offline: exit 0 when valid, 1 when not.
    Verify(verify::VerifyArgs),
    /// Apply the schema to the database.
    Migrate(migrate::MigrateArgs),
    /// List credentials straight from the database.
    List(list::ListArgs),
    /// Revoke a credential straight in the database.
    Revoke(revoke::RevokeArgs),
    /// Print the audit log as JSON lines from the database; `audit prune` trims it.
    Audit(audit::AuditArgs),
    /// Find leaked credential pairs in files or stdin; exit 1 when a live one is found.
    Scan(scan::ScanArgs),
}

impl Cli {
    /// Runs the chosen subcommand. Errors are configuration or I/O problems; `main` prints
    /// them as one line.
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        if !matches!(self.command, Command::Serve(_)) {
            telemetry::init_logging(LogFormat::Text, "warn")?;
        }
        match self.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Issue(args) => issue::run(args),
            Command::Keygen(args) => keygen::run(args),
            Command::Keys(args) => keys::run(args),
            Command::Verify(args) => verify::run(args),
            Command::Migrate(args) => migrate::run(args).await,
            Command::List(args) => list::run(args).await,
            Command::Revoke(args) => revoke::run(args).await,
            Command::Scan(args) => scan::run(args).await,
            Command::Audit(args) => audit::run(args).await,
        }
    }
}

/// Where the data dir is.
#[derive(Debug, Args)]
struct DataDirArgs {
    /// Directory for the default SQLite database and the generated master key.
    #[arg(long, env = "CREDGATE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

/// Where the master key is, when not in the data dir.
#[derive(Debug, Args)]
struct MasterKeyArgs {
    /// File holding the master keys: one per line (64 hex characters), the first mints, all
    /// verify; blank lines and `#` comments are ignored.
    #[arg(long, env = "CREDGATE_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
}

impl MasterKeyArgs {
    fn load(&self, data: &DataDirArgs, missing: WhenMissing) -> anyhow::Result<KeyRing> {
        config::load_master_key(self.master_key_file.as_deref(), &data.data_dir, missing)
            .map(|(key, _)| key)
    }
}

/// Which database: `serve` and the direct-database commands share these flags.
#[derive(Debug, Args)]
struct DatabaseArgs {
    /// sqlite://relative/path.db, sqlite:///absolute/path.db or postgres://… (also read from
    /// DATABASE_URL); default: SQLite at <data dir>/credgate.db.
    #[arg(long, env = "CREDGATE_DATABASE_URL")]
    database_url: Option<String>,
    #[command(flatten)]
    data: DataDirArgs,
}

impl DatabaseArgs {
    /// The database named by `--database-url` / `CREDGATE_DATABASE_URL`, else `DATABASE_URL`;
    /// `None` means the default SQLite file in the data dir.
    fn explicit(&self) -> anyhow::Result<Option<DatabaseTarget>> {
        self.database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
            .map(|u| {
                DatabaseTarget::parse(&u)
                    .map_err(|e| anyhow::anyhow!("invalid --database-url: {e}"))
            })
            .transpose()
    }

    fn target(&self) -> anyhow::Result<DatabaseTarget> {
        Ok(config::database_target(
            self.explicit()?.as_ref(),
            &self.data.data_dir,
        ))
    }

    /// Opens an existing database for the direct-database commands; never creates one.
    async fn open_existing(&self) -> anyhow::Result<Arc<dyn CredentialStore>> {
        let target = self.target()?;
        if let DatabaseTarget::Sqlite(path) = &target {
            ensure_exists(path)?;
        }
        store::open(&target, &store::StoreSettings::default(), Metrics::new()?).await
    }
}

/// Writes `value` as one JSON line; `Ok(false)` when the reader went away (`| head`), so
/// the command can stop quietly.
fn json_line(out: &mut impl std::io::Write, value: &impl serde::Serialize) -> anyhow::Result<bool> {
    match writeln!(out, "{}", serde_json::to_string(value)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn ensure_exists(path: &Path) -> anyhow::Result<()> {
    std::fs::metadata(path)
        .map(|_| ())
        .with_context(|| format!("no database at {}", path.display()))
}
