//! `credgate scan [PATH…]`: finds credential pairs in files (or stdin), keeps those a
//! configured master key derived, and reports each with its state in the database — never
//! the secret. `--revoke` revokes the active ones. Exit 1 when a live pair (active or
//! unregistered) was found: usable as a pre-commit hook or a CI step (SPEC §8.6).

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{DatabaseArgs, MasterKeyArgs};
use credgate::attributes::State;
use credgate::audit::Origin;
use credgate::config::WhenMissing;
use credgate::credential::ApiKey;
use credgate::store::Revocation;

#[derive(Debug, Args)]
pub(super) struct ScanArgs {
    /// Files or directories to scan (directories recursively, `.git` skipped); stdin when
    /// none.
    paths: Vec<PathBuf>,
    /// Revoke every active credential found.
    #[arg(long, env = "CREDGATE_REVOKE")]
    revoke: bool,
    /// Do not read the database: every valid pair is reported with state `unknown` and
    /// counts as live (for a CI runner that holds the master key but cannot reach the
    /// database).
    #[arg(long, env = "CREDGATE_NO_DATABASE", conflicts_with = "revoke")]
    no_database: bool,
    #[command(flatten)]
    key: MasterKeyArgs,
    #[command(flatten)]
    db: DatabaseArgs,
}

/// Where text came from, for the report.
struct Source {
    name: String,
    text: String,
}

pub(super) async fn run(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let keys = args.key.load(&args.db.data, WhenMissing::Fail)?;
    let store = if args.no_database {
        None
    } else {
        Some(args.db.open_existing().await?)
    };
    let mut sources = Vec::new();
    if args.paths.is_empty() {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        sources.push(Source {
            name: "-".into(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        });
    } else {
        for path in &args.paths {
            collect(path, &mut sources)?;
        }
    }
    let (mut live, mut reported) = (0usize, 0usize);
    let mut seen: HashSet<(String, usize, ApiKey)> = HashSet::new();
    for source in &sources {
        for found in credgate::leak::candidates(&source.text) {
            let Some(deriver) = keys.verify(&found.key, &found.secret) else {
                continue; // forged, or derived by a key this deployment does not hold
            };
            if !seen.insert((source.name.clone(), found.line, found.key.clone())) {
                continue;
            }
            let state = match &store {
                None => "unknown".to_owned(),
                Some(store) => match store.get(&found.key).await? {
                    None => "unregistered".to_owned(),
                    Some(record) => record.state.to_string(),
                },
            };
            let mut revoked = None;
            if args.revoke
                && state == State::Active.to_string()
                && let Some(store) = &store
            {
                let origin = Origin::cli()
                    .with("reason", "leaked")
                    .with("found_in", format!("{}:{}", source.name, found.line));
                revoked = Some(store.revoke(&found.key, &origin).await? == Revocation::Revoked);
            }
            if matches!(state.as_str(), "active" | "unregistered" | "unknown")
                && revoked != Some(true)
            {
                live += 1;
            }
            reported += 1;
            let mut line = serde_json::json!({
                "file": source.name,
                "line": found.line,
                "api_key": found.key.as_str(),
                "master_key_id": deriver.key_id(),
                "state": state,
            });
            if let Some(revoked) = revoked {
                line["revoked"] = revoked.into();
            }
            println!("{line}");
        }
    }
    eprintln!(
        "credgate scan: {reported} valid credential pair(s) found, {live} live (active or unregistered)"
    );
    Ok(if live > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Reads a file, or every file under a directory (symbolic links not followed, `.git`
/// skipped).
fn collect(path: &Path, sources: &mut Vec<Source>) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_none_or(|n| n != ".git"))
            .collect();
        entries.sort();
        for entry in entries {
            collect(&entry, sources)?;
        }
    } else if meta.is_file() {
        let bytes = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        sources.push(Source {
            name: path.display().to_string(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    Ok(())
}
