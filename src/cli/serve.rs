//! `credgate serve`: runs the HTTP service until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{DatabaseArgs, MasterKeyArgs};
use credgate::attributes::Scopes;
use credgate::config::{
    Config, DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL, DEFAULT_DB_MAX_CONNECTIONS,
    DEFAULT_DB_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_LAST_USED_INTERVAL, DEFAULT_LISTEN,
    DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, DEFAULT_OPEN_REGISTRATION, DEFAULT_REGISTRATION_SCOPES,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT, MAX_CONNECTIONS, Policy, VerifyStatus,
};
use credgate::startup::{self, Application};
use credgate::store::StoreSettings;
use credgate::telemetry::{self, LogFormat};

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CREDGATE_LISTEN", default_value_t = DEFAULT_LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    key: MasterKeyArgs,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Seconds a positive authentication is cached (0 disables the cache; at most 86400).
    #[arg(long, env = "CREDGATE_CACHE_TTL", default_value_t = DEFAULT_CACHE_TTL.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    cache_ttl: u64,
    /// Most credentials in the authentication cache.
    #[arg(long, env = "CREDGATE_CACHE_CAPACITY", default_value_t = DEFAULT_CACHE_CAPACITY)]
    cache_capacity: u64,
    /// Seconds a request may take, body included.
    #[arg(long, env = "CREDGATE_REQUEST_TIMEOUT",
          default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
    /// Seconds a client may take to send request headers.
    #[arg(long, env = "CREDGATE_HEADER_READ_TIMEOUT",
          default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout: u64,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT.
    #[arg(long, env = "CREDGATE_SHUTDOWN_TIMEOUT",
          default_value_t = DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    shutdown_timeout: u64,
    /// Most PostgreSQL connections for queries (the invalidation listener has one more).
    #[arg(long, env = "CREDGATE_DB_MAX_CONNECTIONS",
          default_value_t = DEFAULT_DB_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    db_max_connections: u32,
    /// Most HTTP connections open at once; beyond it new ones wait in the kernel's backlog and
    /// idle keep-alive connections are closed, oldest first, to make room.
    ///
    /// Default: the open-file limit (soft RLIMIT_NOFILE, `ulimit -n`) minus 32 descriptors
    /// for the process itself (stdio, listener, runtime, logs) and the database's share — SQLite:
    /// 3 × (8 readers + writer + watcher) = 30; PostgreSQL: --db-max-connections + 2 — and
    /// at least 16 (a warning is logged when that does not fit the open-file limit).
    #[arg(long, env = "CREDGATE_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONNECTIONS)))]
    max_connections: Option<u32>,
    /// Seconds a database query may run, or wait for a connection, before it fails (500).
    #[arg(long, env = "CREDGATE_DB_TIMEOUT", default_value_t = DEFAULT_DB_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    db_timeout: u64,
    /// Scopes of a credential registered without a `scopes` field, comma-separated ('' for
    /// none: such a credential manages only itself).
    #[arg(long, env = "CREDGATE_REGISTRATION_SCOPES",
          default_value = DEFAULT_REGISTRATION_SCOPES, value_parser = Scopes::parse_list)]
    registration_scopes: Scopes,
    /// Whether `POST /credentials` needs no credential; `false` requires one holding
    /// `credentials:write`.
    #[arg(long, env = "CREDGATE_OPEN_REGISTRATION", default_value_t = DEFAULT_OPEN_REGISTRATION,
          action = clap::ArgAction::Set)]
    open_registration: bool,
    /// Status of a successful `/auth/verify`: 204, or 200 (Envoy's ext_authz needs 200).
    #[arg(long, env = "CREDGATE_VERIFY_OK_STATUS", default_value = "204",
          value_parser = ["200", "204"])]
    verify_ok_status: String,
    /// Seconds between writes of `last_used_at`: each credential's is written at most once
    /// per interval, in batches, off the request path (0 disables tracking; at most 86400).
    #[arg(long, env = "CREDGATE_LAST_USED_INTERVAL",
          default_value_t = DEFAULT_LAST_USED_INTERVAL.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    last_used_interval: u64,
    /// Log format.
    #[arg(long, env = "CREDGATE_LOG_FORMAT", value_enum,
          default_value_t = LogFormatArg::from(DEFAULT_LOG_FORMAT))]
    log_format: LogFormatArg,
    /// Log level or filter directive (e.g. `info`, `debug`, `credgate=debug,sqlx=warn`).
    #[arg(long, env = "CREDGATE_LOG_LEVEL", default_value = DEFAULT_LOG_LEVEL)]
    log_level: String,
}

/// `--log-format`'s values: the library's [`LogFormat`], spelled for the command line (the
/// library does not depend on clap). Converted both ways, so a new format fails to compile
/// until it is here too.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl From<LogFormat> for LogFormatArg {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
}

impl From<LogFormatArg> for LogFormat {
    fn from(format: LogFormatArg) -> Self {
        match format {
            LogFormatArg::Text => Self::Text,
            LogFormatArg::Json => Self::Json,
        }
    }
}

pub(super) async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_logging(args.log_format.into(), &args.log_level)?;
    let database = args.db.explicit()?;
    let config = Config {
        listen: args.listen,
        data_dir: args.db.data.data_dir,
        database,
        master_key_file: args.key.master_key_file,
        cache_ttl: Duration::from_secs(args.cache_ttl),
        cache_capacity: args.cache_capacity,
        request_timeout: Duration::from_secs(args.request_timeout),
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        store: StoreSettings {
            max_connections: args.db_max_connections,
            timeout: Duration::from_secs(args.db_timeout),
        },
        max_connections: args.max_connections,
        last_used_interval: Duration::from_secs(args.last_used_interval),
        policy: Policy {
            registration_scopes: args.registration_scopes,
            open_registration: args.open_registration,
            verify_ok_status: if args.verify_ok_status == "200" {
                VerifyStatus::Ok
            } else {
                VerifyStatus::NoContent
            },
        },
    };
    let shutdown = startup::shutdown_signal()?;
    let (key_file, data_dir) = (config.master_key_file.clone(), config.data_dir.clone());
    let app = Application::build(config).await?;
    let reload = startup::reload_keys_on_hangup(app.state().auth.clone(), key_file, data_dir)?;
    tokio::spawn(reload);
    // The process ends right after the service stops, and the operating system reclaims its
    // memory at once; freeing the authentication cache entry by entry on the way out would
    // only delay the exit (about 0.4 s per 100 000 cached credentials, measured). So one handle
    // on the shared state outlives the service and is never dropped.
    let state = app.state().clone();
    let result = app.run_until_stopped(shutdown).await;
    std::mem::forget(state);
    result?;
    Ok(ExitCode::SUCCESS)
}
