//! `credgate keys`: the ids of the configured master keys (SPEC §8.3), never the keys, as JSON
//! lines, the minting key first. What `GET /credentials?master_key_id=` takes.

use std::process::ExitCode;

use clap::Args;

use super::{DataDirArgs, MasterKeyArgs};
use credgate::config::WhenMissing;

#[derive(Debug, Args)]
pub(super) struct KeysArgs {
    #[command(flatten)]
    key: MasterKeyArgs,
    #[command(flatten)]
    data: DataDirArgs,
}

pub(super) fn run(args: KeysArgs) -> anyhow::Result<ExitCode> {
    let keys = args.key.load(&args.data, WhenMissing::Fail)?;
    for (i, id) in keys.key_ids().enumerate() {
        println!(
            "{}",
            serde_json::json!({ "master_key_id": id, "mints": i == 0 })
        );
    }
    Ok(ExitCode::SUCCESS)
}
