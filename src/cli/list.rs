//! `credgate list`: prints credentials as JSON lines, straight from the database.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Args;

use super::DatabaseArgs;
use credgate::store::ListQuery;

#[derive(Debug, Args)]
pub(super) struct ListArgs {
    /// Only active (true) or revoked (false) credentials.
    #[arg(long, env = "CREDGATE_ACTIVE")]
    active: Option<bool>,
    /// Only credentials derived with this master key (an id from `credgate keys`): who still
    /// depends on a key before it is removed.
    #[arg(long, env = "CREDGATE_MASTER_KEY_ID", value_parser = master_key_id)]
    master_key_id: Option<String>,
    #[command(flatten)]
    db: DatabaseArgs,
}

const PAGE: u32 = 1000;

pub(super) async fn run(args: ListArgs) -> anyhow::Result<ExitCode> {
    let store = args.db.open_existing().await?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut query = ListQuery {
        after: None,
        active: args.active,
        limit: PAGE,
        master_key_id: args.master_key_id,
        ..ListQuery::default()
    };
    loop {
        let page = store.list(&query).await?;
        for record in &page {
            if !super::json_line(&mut out, record)? {
                return Ok(ExitCode::SUCCESS);
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => {
                query.after = Some(credgate::credential::ApiKey::parse(&last.api_key).map_err(
                    |e| anyhow::anyhow!("stored api_key {:?} is malformed: {e}", last.api_key),
                )?);
            }
            _ => break,
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn master_key_id(text: &str) -> Result<String, String> {
    if credgate::attributes::is_master_key_id(text) {
        Ok(text.to_owned())
    } else {
        Err("a master key id is 16 lowercase hexadecimal characters".into())
    }
}
