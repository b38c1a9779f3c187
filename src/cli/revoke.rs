//! `credgate revoke`: revokes a credential straight in the database, for when the API is
//! unreachable. Running instances drop it from their caches through the change log.

use std::process::ExitCode;

use clap::Args;

use super::DatabaseArgs;
use credgate::audit::Origin;
use credgate::credential::ApiKey;
use credgate::store::Revocation;

#[derive(Debug, Args)]
pub(super) struct RevokeArgs {
    /// The api_key to revoke.
    api_key: String,
    /// Why, for the audit log (its event's detail.reason).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    db: DatabaseArgs,
}

pub(super) async fn run(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let key = ApiKey::parse(&args.api_key).map_err(|e| anyhow::anyhow!("api_key {e}"))?;
    let store = args.db.open_existing().await?;
    let mut origin = Origin::cli();
    if let Some(reason) = args.reason {
        origin = origin.with("reason", reason);
    }
    match store.revoke(&key, &origin).await? {
        Revocation::Revoked => {
            println!(
                "{}",
                serde_json::json!({ "api_key": key.as_str(), "revoked": true })
            );
            Ok(ExitCode::SUCCESS)
        }
        Revocation::NotFound => {
            eprintln!("credgate: {key} is unknown or already revoked");
            Ok(ExitCode::from(1))
        }
    }
}
