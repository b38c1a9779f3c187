//! `credgate keygen`: writes a new random master key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use credgate::config::write_private;
use credgate::credential::{MasterKey, SecretDeriver};

#[derive(Debug, Args)]
pub(super) struct KeygenArgs {
    /// File to create (mode 0600; an existing file is never overwritten). Without it the
    /// key is printed on stdout.
    #[arg(long, env = "CREDGATE_OUT")]
    out: Option<PathBuf>,
}

pub(super) fn run(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let key = MasterKey::generate();
    let id = SecretDeriver::new(&key).key_id().to_owned();
    match args.out {
        Some(path) => {
            write_private(&path, key.to_hex_line().as_bytes())?;
            eprintln!(
                "wrote a new master key to {} (master_key_id {id})",
                path.display()
            );
        }
        None => {
            print!("{}", key.to_hex_line());
            eprintln!("master_key_id {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
