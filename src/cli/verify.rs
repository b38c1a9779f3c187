//! `credgate verify`: checks a pair offline against the master key.

use std::process::ExitCode;

use clap::Args;

use super::{DataDirArgs, MasterKeyArgs};
use credgate::config::WhenMissing;
use credgate::credential::{ApiKey, ApiSecret};

#[derive(Debug, Args)]
pub(super) struct VerifyArgs {
    /// The api_key.
    #[arg(long, env = "CREDGATE_API_KEY")]
    api_key: String,
    /// The api_secret (prefer the environment variable: arguments show in `ps`).
    #[arg(long, env = "CREDGATE_API_SECRET", hide_env_values = true)]
    api_secret: String,
    #[command(flatten)]
    key: MasterKeyArgs,
    #[command(flatten)]
    data: DataDirArgs,
}

pub(super) fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let keys = args.key.load(&args.data, WhenMissing::Fail)?;
    let key = match ApiKey::parse(&args.api_key) {
        Ok(key) => key,
        Err(e) => return Ok(invalid(&format!("api_key {e}"))),
    };
    let secret = match ApiSecret::parse(&args.api_secret) {
        Ok(secret) => secret,
        Err(e) => return Ok(invalid(&format!("api_secret {e}"))),
    };
    if let Some(deriver) = keys.verify(&key, &secret) {
        println!("valid (master key {})", deriver.key_id());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(invalid("api_secret is not the derivation of api_key"))
    }
}

fn invalid(why: &str) -> ExitCode {
    println!("invalid: {why}");
    ExitCode::from(1)
}
